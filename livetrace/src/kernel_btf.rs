//! Just enough of a BTF reader to find member offsets in kernel structs (e.g. where `pid` lives
//! in `struct task_struct`), so BPF programs written in Rust, which get no CO-RE relocations from
//! aya-ebpf, can read them through offsets passed as load-time globals.
//!
//! Format: a header, then type records (`btf_type` plus kind-specific trailing data), then a
//! string table. See the kernel's Documentation/bpf/btf.rst.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug)]
enum Type {
    Composite { members: Vec<Member> },
    Other,
}

/// The struct and union types of one BTF blob.
pub struct KernelBtf {
    /// Indexed by type id (id 0 is `void`).
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
}

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Hidden override of [`VMLINUX_BTF`], for tests that simulate a kernel without BTF (or point
/// at a BTF file of another kernel).
pub const BTF_PATH_ENV: &str = "LIVETRACE_BTF_PATH";

/// The kernel BTF file livetrace reads: [`VMLINUX_BTF`], unless [`BTF_PATH_ENV`] says otherwise.
pub fn vmlinux_path() -> PathBuf {
    std::env::var_os(BTF_PATH_ENV).map_or_else(|| PathBuf::from(VMLINUX_BTF), PathBuf::from)
}

/// Why a kernel's BTF may be missing, and what to do (also said by `livetrace check`).
pub const MISSING_BTF_FIX: &str = "the kernel was built without CONFIG_DEBUG_INFO_BTF, or /sys \
                                   is not mounted (`mount -t sysfs sysfs /sys`)";

/// Why a kernel BTF file could not be read, and what to do about it.
fn missing_btf(path: &Path, err: &dyn std::fmt::Display) -> String {
    format!(
        "cannot read the kernel's BTF at {} ({err}): {MISSING_BTF_FIX}; check with `ls -l \
         {VMLINUX_BTF}`",
        path.display()
    )
}

/// The kernel's BTF as aya reads it (for `tp_btf` programs), from [`vmlinux_path`].
pub fn aya_btf() -> anyhow::Result<aya::Btf> {
    let path = vmlinux_path();
    if let Err(err) = std::fs::metadata(&path) {
        bail!(missing_btf(&path, &err));
    }
    aya::Btf::parse_file(&path, aya::Endianness::default())
        .map_err(|err| anyhow::anyhow!(missing_btf(&path, &err)))
}

impl KernelBtf {
    /// The running kernel's BTF (from [`vmlinux_path`]).
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        let path = vmlinux_path();
        let data = std::fs::read(&path).map_err(|err| anyhow::anyhow!(missing_btf(&path, &err)))?;
        Self::parse(&data).with_context(|| format!("cannot parse {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        let u16_at = |at: usize| -> anyhow::Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(at..at + 2).context("truncated BTF")?.try_into()?,
            ))
        };
        let u32_at = |at: usize| -> anyhow::Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(at..at + 4).context("truncated BTF")?.try_into()?,
            ))
        };
        ensure!(u16_at(0)? == BTF_MAGIC, "not little-endian BTF (bad magic)");
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = hdr_len + type_off;
        let strings_start = hdr_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .context("truncated BTF string table")?;
        let name_at = |offset: u32| -> String {
            let rest = strings.get(offset as usize..).unwrap_or_default();
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        };

        let mut types = vec![Type::Other]; // id 0: void
        let mut by_name = HashMap::new();
        let mut at = types_start;
        let end = types_start + type_len;
        while at < end {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let trailing = match kind {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                0 | 2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other} at byte {at}"),
            };
            let ty = if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = at + 12 * m;
                    let offset = u32_at(base + 8)?;
                    members.push(Member {
                        name: name_at(u32_at(base)?),
                        type_id: u32_at(base + 4)?,
                        bit_offset: if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        },
                    });
                }
                let name = name_at(name_off);
                if !name.is_empty() && kind == KIND_STRUCT {
                    by_name.entry(name).or_insert(types.len() as u32);
                }
                Type::Composite { members }
            } else {
                Type::Other
            };
            types.push(ty);
            at += trailing;
        }
        Ok(Self { types, by_name })
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        let id = *self
            .by_name
            .get(name)
            .with_context(|| format!("the kernel's BTF has no struct {name}"))?;
        self.find(id, member, 0, 0)
            .map(|bits| bits / 8)
            .with_context(|| format!("the kernel's struct {name} has no member {member}"))
    }

    /// Anonymous members are followed at most this deep, visiting at most this many members in
    /// all: real kernels nest a few levels, and a malformed blob whose anonymous members refer
    /// back to their own struct must neither recurse forever nor explode combinatorially.
    const MAX_NESTING: u32 = 32;
    const MAX_VISITS: u32 = 1 << 20;

    fn find(&self, id: u32, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let mut budget = Self::MAX_VISITS;
        self.find_within(id, member, base_bits, depth, &mut budget)
    }

    fn find_within(
        &self,
        id: u32,
        member: &str,
        base_bits: u32,
        depth: u32,
        budget: &mut u32,
    ) -> Option<u32> {
        let Type::Composite { members, .. } = self.types.get(id as usize)? else {
            return None;
        };
        if depth > Self::MAX_NESTING {
            return None;
        }
        for m in members {
            *budget = budget.checked_sub(1)?;
            if m.name == member {
                return base_bits.checked_add(m.bit_offset);
            }
            if m.name.is_empty()
                && let Some(bits) = self.find_within(
                    m.type_id,
                    member,
                    base_bits.checked_add(m.bit_offset)?,
                    depth + 1,
                    budget,
                )
            {
                return Some(bits);
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob: `struct task { int flags; union { int a; struct { int pad; int pid; }; }; }`
    /// with an `int` type, to check direct and nested (anonymous) member offsets.
    pub(crate) fn synthetic_btf() -> Vec<u8> {
        let strings = b"\0int\0task\0flags\0pid\0pad\0a\0";
        let s = |name: &str| -> u32 {
            let needle = format!("{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
        };
        let mut types: Vec<u32> = Vec::new();
        // id 1: int (kind 1), size 4, encoding word.
        types.extend([s("int"), 1 << 24, 4, 32]);
        // id 2: anonymous struct { int pad @0; int pid @32 }.
        types.extend([0, (4 << 24) | 2, 8]);
        types.extend([s("pad"), 1, 0, s("pid"), 1, 32]);
        // id 3: anonymous union { int a; struct(id 2) }.
        types.extend([0, (5 << 24) | 2, 8]);
        types.extend([s("a"), 1, 0, 0, 2, 0]);
        // id 4: struct task { int flags @0; union(id 3) @64 }, kind_flag set (bitfield encoding).
        types.extend([s("task"), (1 << 31) | (4 << 24) | 2, 16]);
        types.extend([s("flags"), 1, 0, 0, 3, 64]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(BTF_MAGIC.to_le_bytes());
        blob.extend([1u8, 0]); // version, flags
        blob.extend(24u32.to_le_bytes()); // hdr_len
        blob.extend(0u32.to_le_bytes()); // type_off
        blob.extend((type_bytes.len() as u32).to_le_bytes());
        blob.extend((type_bytes.len() as u32).to_le_bytes()); // str_off
        blob.extend((strings.len() as u32).to_le_bytes());
        blob.extend(type_bytes);
        blob.extend(strings);
        blob
    }

    /// Direct members and members of anonymous unions/structs resolve to byte offsets.
    #[test]
    fn finds_direct_and_nested_members() {
        let btf = KernelBtf::parse(&synthetic_btf()).unwrap();
        assert_eq!(btf.member_offset("task", "flags").unwrap(), 0);
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 12);
        assert_eq!(btf.member_offset("task", "a").unwrap(), 8);
        let err = btf.member_offset("task", "nope").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(btf.member_offset("nostruct", "pid").is_err());
    }

    /// Garbage is an error, never a panic.
    #[test]
    fn rejects_garbage() {
        assert!(KernelBtf::parse(b"").is_err());
        assert!(KernelBtf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 50]).is_err());
        let mut truncated = synthetic_btf();
        truncated.truncate(40);
        assert!(KernelBtf::parse(&truncated).is_err());
    }

    /// This kernel's task_struct has pid and tgid (adjacent ints) and flags. livetrace needs
    /// kernel BTF (CONFIG_DEBUG_INFO_BTF) for offcpu, so its absence fails loudly here.
    #[test]
    fn reads_this_kernels_task_struct() {
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4);
        btf.member_offset("task_struct", "flags").unwrap();
    }
}
