//! USDT argument specs for x86-64, as `sys/sdt.h` writes them: space-separated
//! `[-]SIZE[f]@OPERAND`, where a negative size is a signed value, `f` marks a floating-point one,
//! and the operand is GCC's choice under the `nor` constraint, in AT&T syntax:
//!
//! | operand | example | value |
//! | --- | --- | --- |
//! | register | `%rsi`, `%r14d`, `%al` | the register |
//! | constant | `$5`, `$-1` | the number |
//! | memory | `-20(%rbp)`, `(%r12)` | the SIZE bytes at register + displacement |
//! | indexed memory | `8(%rdi,%rax,8)`, `(%rax,%rsi)` | at base + index × scale + displacement |
//! | a global | `NBuffers(%rip)`, `40+CheckpointStats(%rip)` | at the symbol (+ offset) |
//!
//! Every register name maps to its slot in the kernel's `struct pt_regs`, whatever its width:
//! SIZE truncates. Specs come from the traced program's file: anything else is an error that
//! quotes it, never a guess.

use std::fmt;

/// Where an argument's value is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    Constant(i64),
    Register(Register),
    Memory {
        base: Register,
        index: Option<(Register, u8)>,
        displacement: i64,
    },
    /// `[N+]SYMBOL(%rip)`: a global, to be found in the file's symbol table.
    Global {
        symbol: String,
        offset: i64,
    },
}

/// One argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    pub signed: bool,
    pub float: bool,
    pub operand: Operand,
}

/// A 64-bit general register (or `rip`), by its `pt_regs` slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    /// The 64-bit name (`rax` for `%eax`, `%ax` and `%al`).
    pub name: &'static str,
    /// The byte offset of its slot in x86-64's `struct pt_regs`.
    pub pt_regs_offset: u8,
}

/// The most arguments a probe has (`sys/sdt.h` stops at 12).
pub const MAX_ARGS: usize = 12;

/// x86-64 `struct pt_regs`: each register's 64-bit name, the other names of its low bits, and
/// its slot.
const REGISTERS: &[(&str, &[&str], u8)] = &[
    ("r15", &["r15d", "r15w", "r15b"], 0),
    ("r14", &["r14d", "r14w", "r14b"], 8),
    ("r13", &["r13d", "r13w", "r13b"], 16),
    ("r12", &["r12d", "r12w", "r12b"], 24),
    ("rbp", &["ebp", "bp", "bpl"], 32),
    ("rbx", &["ebx", "bx", "bl"], 40),
    ("r11", &["r11d", "r11w", "r11b"], 48),
    ("r10", &["r10d", "r10w", "r10b"], 56),
    ("r9", &["r9d", "r9w", "r9b"], 64),
    ("r8", &["r8d", "r8w", "r8b"], 72),
    ("rax", &["eax", "ax", "al"], 80),
    ("rcx", &["ecx", "cx", "cl"], 88),
    ("rdx", &["edx", "dx", "dl"], 96),
    ("rsi", &["esi", "si", "sil"], 104),
    ("rdi", &["edi", "di", "dil"], 112),
    ("rip", &["eip"], 128),
    ("rsp", &["esp", "sp", "spl"], 152),
];

impl Register {
    /// The instruction pointer: at a uprobe hit, the probed address.
    pub const RIP: Self = Self {
        name: "rip",
        pt_regs_offset: 128,
    };

    fn named(name: &str) -> Option<Self> {
        REGISTERS
            .iter()
            .find(|(full, others, _)| *full == name || others.contains(&name))
            .map(|&(name, _, pt_regs_offset)| Self {
                name,
                pt_regs_offset,
            })
    }
}

/// Parses a probe's argument specs (empty for a probe without arguments).
pub fn parse(specs: &str) -> Result<Vec<Arg>, String> {
    let args: Vec<Arg> = specs
        .split_ascii_whitespace()
        .map(parse_arg)
        .collect::<Result<_, _>>()?;
    if args.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments, more than the {MAX_ARGS} sys/sdt.h allows",
            args.len()
        ));
    }
    Ok(args)
}

fn parse_arg(spec: &str) -> Result<Arg, String> {
    let bad = |why: &str| format!("argument spec '{spec}' {why}");
    let (size, operand) = spec
        .split_once('@')
        .ok_or_else(|| bad("has no '@' between its size and its operand"))?;
    let (size, float) = match size.strip_suffix('f') {
        Some(size) => (size, true),
        None => (size, false),
    };
    let (size, signed) = match size.strip_prefix('-') {
        Some(size) => (size, true),
        None => (size, false),
    };
    let size = match size {
        "1" => 1,
        "2" => 2,
        "4" => 4,
        "8" => 8,
        _ => return Err(bad("has a size other than 1, 2, 4 or 8 bytes")),
    };
    let operand = parse_operand(operand).map_err(|why| bad(&why))?;
    Ok(Arg {
        size,
        signed,
        float,
        operand,
    })
}

fn parse_operand(text: &str) -> Result<Operand, String> {
    if let Some(value) = text.strip_prefix('$') {
        return number(value).map(Operand::Constant);
    }
    if let Some(name) = text.strip_prefix('%') {
        return register(name).map(Operand::Register);
    }
    let (before, inside) = text
        .strip_suffix(')')
        .and_then(|t| t.split_once('('))
        .ok_or_else(|| {
            format!("has an operand '{text}' that is no register, constant or memory")
        })?;
    let parts: Vec<&str> = inside.split(',').map(str::trim).collect();
    let base = register(
        parts[0]
            .strip_prefix('%')
            .ok_or_else(|| format!("has a base '{}' that is no register", parts[0]))?,
    )?;
    let index = match parts.as_slice() {
        [_] => None,
        [_, index] | [_, index, ""] => Some((index_register(index)?, 1)),
        [_, index, scale] => {
            let scale = match *scale {
                "1" => 1,
                "2" => 2,
                "4" => 4,
                "8" => 8,
                _ => return Err(format!("has a scale '{scale}' other than 1, 2, 4 or 8")),
            };
            Some((index_register(index)?, scale))
        }
        _ => {
            return Err(format!(
                "has a memory operand '({inside})' of more than three parts"
            ));
        }
    };
    // A displacement, a symbol, or `N+SYMBOL` (GCC's form for a field of a global).
    let starts_like_symbol = |s: &str| s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let (offset, symbol) = match before.split_once('+') {
        Some((n, symbol)) if starts_like_symbol(symbol) => (number(n)?, Some(symbol)),
        _ if starts_like_symbol(before) => (0, Some(before)),
        _ if before.is_empty() => (0, None),
        _ => (number(before)?, None),
    };
    match symbol {
        Some(symbol) if base.name == "rip" && index.is_none() => {
            if !symbol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$'))
            {
                return Err(format!("names a global '{symbol}' that is no symbol name"));
            }
            Ok(Operand::Global {
                symbol: symbol.to_owned(),
                offset,
            })
        }
        Some(symbol) => Err(format!(
            "names a symbol '{symbol}' relative to %{}, not to %rip",
            base.name
        )),
        None => Ok(Operand::Memory {
            base,
            index,
            displacement: offset,
        }),
    }
}

fn index_register(text: &str) -> Result<Register, String> {
    let name = text
        .strip_prefix('%')
        .ok_or_else(|| format!("has an index '{text}' that is no register"))?;
    register(name)
}

fn register(name: &str) -> Result<Register, String> {
    Register::named(name).ok_or_else(|| format!("names a register '%{name}' livetrace cannot read"))
}

fn number(text: &str) -> Result<i64, String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => digits.parse::<i64>(),
    }
    .map_err(|_| format!("has a number '{text}' that is not one"))?;
    Ok(if negative { -value } else { value })
}

impl fmt::Display for Arg {
    /// `s32 in %rax`, `u64 at -16(%rbp)`, `s32 = -1`, `u64 at NBuffers`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match (self.float, self.signed) {
            (true, _) => "f",
            (false, true) => "s",
            (false, false) => "u",
        };
        write!(f, "{kind}{}", u32::from(self.size) * 8)?;
        match &self.operand {
            Operand::Constant(value) => write!(f, " = {value}"),
            Operand::Register(register) => write!(f, " in %{}", register.name),
            Operand::Memory {
                base,
                index,
                displacement,
            } => {
                write!(f, " at ")?;
                if *displacement != 0 {
                    write!(f, "{displacement}")?;
                }
                write!(f, "(%{}", base.name)?;
                if let Some((index, scale)) = index {
                    write!(f, ",%{},{scale}", index.name)?;
                }
                write!(f, ")")
            }
            Operand::Global { symbol, offset: 0 } => write!(f, " at {symbol}"),
            Operand::Global { symbol, offset } => write!(f, " at {symbol}+{offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &'static str) -> Register {
        Register::named(name).unwrap()
    }

    /// Every form seen in PostgreSQL 15, CPython 3.11, libstdc++ and the JVM, and the indexed
    /// and floating-point forms GCC writes at -O2.
    #[test]
    fn parses_every_operand_form() {
        let one = |spec: &str| parse(spec).unwrap().remove(0);
        assert_eq!(
            one("-4@%r14d"),
            Arg {
                size: 4,
                signed: true,
                float: false,
                operand: Operand::Register(reg("r14"))
            }
        );
        assert_eq!(one("1@%sil").operand, Operand::Register(reg("rsi")));
        assert_eq!(one("8@$5").operand, Operand::Constant(5));
        assert_eq!(one("-4@$-1").operand, Operand::Constant(-1));
        assert_eq!(
            one("-4@-136(%rbp)").operand,
            Operand::Memory {
                base: reg("rbp"),
                index: None,
                displacement: -136
            }
        );
        assert_eq!(
            one("4@(%r12)").operand,
            Operand::Memory {
                base: reg("r12"),
                index: None,
                displacement: 0
            }
        );
        assert_eq!(
            one("-8@8(%rdi,%rax,8)").operand,
            Operand::Memory {
                base: reg("rdi"),
                index: Some((reg("rax"), 8)),
                displacement: 8
            }
        );
        assert_eq!(
            one("1@12(%rdi,%r8)").operand,
            Operand::Memory {
                base: reg("rdi"),
                index: Some((reg("r8"), 1)),
                displacement: 12
            }
        );
        assert_eq!(
            one("-4@NBuffers(%rip)").operand,
            Operand::Global {
                symbol: "NBuffers".into(),
                offset: 0
            }
        );
        assert_eq!(
            one("-4@40+CheckpointStats(%rip)").operand,
            Operand::Global {
                symbol: "CheckpointStats".into(),
                offset: 40
            }
        );
        let float = one("8f@%rax");
        assert!(float.float && float.size == 8);
        assert_eq!(parse("").unwrap(), Vec::new());
        assert_eq!(parse("8@%rsi -4@%eax 8@$0").unwrap().len(), 3);
    }

    /// What is not a spec is refused with the spec quoted, not guessed at.
    #[test]
    fn refuses_what_it_cannot_read() {
        for (spec, why) in [
            ("8%rax", "no '@'"),
            ("3@%rax", "size"),
            ("8@%ah", "register '%ah'"),
            ("8@%xmm0", "register '%xmm0'"),
            ("8@$x", "number"),
            ("8@4(%rax,%rbx,3)", "scale"),
            ("8@sym(%rbx)", "not to %rip"),
            ("8@(%rax", "operand"),
            ("8@", "operand"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(err.contains(spec) && err.contains(why), "{spec}: {err}");
        }
        let thirteen = vec!["8@%rax"; 13].join(" ");
        assert!(parse(&thirteen).unwrap_err().contains("13 arguments"));
    }

    #[test]
    fn describes_arguments() {
        let shown: Vec<String> = parse("-4@%eax 8@-16(%rbp) -4@$-1 8@(%rdi,%rax,8) 4@8+g(%rip)")
            .unwrap()
            .iter()
            .map(Arg::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "s32 in %rax",
                "u64 at -16(%rbp)",
                "s32 = -1",
                "u64 at (%rdi,%rax,8)",
                "u32 at g+8"
            ]
        );
    }
}
