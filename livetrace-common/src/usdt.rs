//! A USDT argument as the BPF programs read it: where its value is (a constant, a register, the
//! memory at a register plus a displacement, or at base + index × scale + displacement) and how
//! wide and signed it is. User space turns the spec strings of `.note.stapsdt` into these, one
//! per probe site, and gives each site's index as the BPF cookie of its link.

/// The value is `displacement` itself.
pub const ARG_CONSTANT: u8 = 0;
/// The value is in the register at `register` (a byte offset into `struct pt_regs`).
pub const ARG_REGISTER: u8 = 1;
/// The value is in memory at register + `displacement`. A global (`SYMBOL(%rip)`) is this, on
/// `rip` with the displacement from the probe's own address: at a uprobe hit, `rip` is that
/// address in whatever process it fired in.
pub const ARG_MEMORY: u8 = 2;
/// The value is in memory at register + (index register << `scale_shift`) + `displacement`.
pub const ARG_INDEXED: u8 = 3;
/// The argument cannot be read (a float, or a global not in the symbol table): counted.
pub const ARG_UNREADABLE: u8 = 4;

/// One argument of one probe site.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgSpec {
    pub displacement: i64,
    pub kind: u8,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// Sign-extend from `size` bytes.
    pub signed: u8,
    pub scale_shift: u8,
    pub register: u8,
    pub index_register: u8,
    pub _pad: [u8; 2],
}

/// The largest byte offset of a register `struct pt_regs` holds (x86-64's `ss`).
pub const MAX_REGISTER_OFFSET: u8 = 160;

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]` integers with explicit padding.
unsafe impl aya::Pod for ArgSpec {}

#[cfg(test)]
mod tests {
    #[test]
    fn arg_spec_has_no_padding() {
        assert_eq!(core::mem::size_of::<super::ArgSpec>(), 16);
    }
}
