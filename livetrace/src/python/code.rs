//! Naming the code objects the BPF walk recorded: a code object's qualified name, file and first
//! line, read once from the process and kept, and the line a frame's position is on, from its
//! table of lines (the location table of 3.11+, `Objects/locations.md`; 3.10's line table; the
//! `co_lnotab` of 3.8 and 3.9).

use std::{collections::HashMap, sync::Arc};

use super::{layout::Lines, process::Interpreter};
use crate::proc;

/// What a code object says of itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Code {
    /// The qualified name on 3.11+ ("Worker.run"); the bare name before ("run").
    pub qualname: String,
    pub filename: String,
    firstlineno: i32,
    linetable: Vec<u8>,
}

/// Longest line table read: a bound against a pointer gone astray.
const MAX_LINETABLE: usize = 1 << 16;

/// A process's code objects, each read once.
pub struct Codes {
    pub interpreter: Interpreter,
    known: HashMap<u64, Option<Arc<Code>>>,
}

impl Codes {
    pub fn new(interpreter: Interpreter) -> Self {
        Self {
            interpreter,
            known: HashMap::new(),
        }
    }

    /// The code object at `address`; `None` if it is not one (a freed one, say) or cannot be read.
    pub fn get(&mut self, address: u64) -> Option<Arc<Code>> {
        if let Some(known) = self.known.get(&address) {
            return known.clone();
        }
        let code = self.read(address).map(Arc::new);
        self.known.insert(address, code.clone());
        code
    }

    fn read(&self, address: u64) -> Option<Code> {
        let interpreter = &self.interpreter;
        let layout = interpreter.layout.code;
        let header = proc::memory::read(interpreter.pid, address, layout.bytecode as usize)?;
        let u64_at = |offset: u64| -> Option<u64> {
            let at = offset as usize;
            Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?))
        };
        if u64_at(8)? != interpreter.code_type {
            return None;
        }
        let firstlineno = u64_at(layout.firstlineno)? as u32 as i32;
        let linetable = u64_at(layout.linetable)?;
        let table_len = usize::try_from(self.read_u64(linetable.wrapping_add(16))?)
            .ok()?
            .min(MAX_LINETABLE);
        Some(Code {
            // The traced program chose these (a code object can be renamed to anything):
            // escaped where they enter, as every other name from a process is.
            qualname: crate::names::sanitized(&self.interpreter.read_str(u64_at(layout.name)?)?),
            filename: crate::names::sanitized(
                &self.interpreter.read_str(u64_at(layout.filename)?)?,
            ),
            firstlineno,
            linetable: if table_len == 0 {
                Vec::new()
            } else {
                proc::memory::read(interpreter.pid, linetable.wrapping_add(32), table_len)?
            },
        })
    }

    fn read_u64(&self, address: u64) -> Option<u64> {
        self.interpreter.read_u64(address)
    }
}

impl Code {
    /// The line that code object `address` of `interpreter` is on, at the position the walk read:
    /// a pointer to the instruction (3.11+), or `f_lasti` in the low half (before 3.11).
    pub fn line(&self, interpreter: &Interpreter, address: u64, instr: u64) -> Option<u32> {
        let code = &interpreter.layout.code;
        let lasti = i64::from(instr as u32 as i32);
        let line = match code.lines {
            Lines::Locations => {
                let offset = instr.wrapping_sub(address.wrapping_add(code.bytecode)) as i64;
                line_at(&self.linetable, self.firstlineno, offset)
            }
            Lines::LineTable310 => line_at_310(&self.linetable, self.firstlineno, lasti * 2),
            Lines::Lnotab => Some(line_at_lnotab(&self.linetable, self.firstlineno, lasti)),
        };
        line.and_then(|l| u32::try_from(l).ok())
    }
}

/// The line of the instruction at byte `offset`, from a `co_lnotab` of 3.8 or 3.9: pairs of an
/// unsigned byte delta and a signed line delta, each pair starting a new line at its address.
fn line_at_lnotab(table: &[u8], firstlineno: i32, offset: i64) -> i32 {
    let mut line = firstlineno;
    let mut address = 0i64;
    for pair in table.chunks_exact(2) {
        address += i64::from(pair[0]);
        if address > offset {
            break;
        }
        line = line.wrapping_add(i32::from(pair[1] as i8));
    }
    line
}

/// The line of the instruction at byte `offset`, from 3.10's `co_linetable`: pairs of an
/// unsigned byte delta and a signed line delta, each pair covering the addresses from the end of
/// the last one; a line delta of -128 means the range has no line. An offset before the first
/// instruction (`f_lasti` of -1: not started) is on the first line.
fn line_at_310(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    if offset < 0 {
        return Some(firstlineno);
    }
    let mut line = firstlineno;
    let mut end = 0i64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += i64::from(pair[0]);
        let delta = pair[1] as i8;
        if delta != -128 {
            line = line.wrapping_add(i32::from(delta));
        }
        if (start..end).contains(&offset) {
            return (delta != -128).then_some(line);
        }
    }
    None
}

/// The line of the code unit at byte `offset`, from a 3.11+ location table: entries of a header
/// byte (bit 7 set; bits 3-6 the kind; bits 0-2 the code units covered, less one) and their
/// operands. A line delta is a signed varint for kinds 13 and 14, 0 to 2 for kinds 10 to 12, 0
/// for the short kinds 0 to 9; kind 15 has no line (and does not reset the running one). An
/// offset before the first instruction (a frame that has not started) is on the first line.
fn line_at(table: &[u8], firstlineno: i32, offset: i64) -> Option<i32> {
    if offset < 0 {
        return Some(firstlineno);
    }
    let mut line = firstlineno;
    let mut end = 0i64;
    let mut at = 0usize;
    while at < table.len() {
        let header = table[at];
        at += 1;
        if header & 0x80 == 0 {
            continue;
        }
        let kind = (header >> 3) & 15;
        let start = end;
        end += (i64::from(header & 7) + 1) * 2;
        let delta = match kind {
            13 | 14 => {
                let (value, used) = varint(&table[at..])?;
                at += used;
                let magnitude = i32::try_from(value >> 1).ok()?;
                if value & 1 != 0 {
                    -magnitude
                } else {
                    magnitude
                }
            }
            10..=12 => i32::from(kind - 10),
            _ => 0,
        };
        line = line.checked_add(delta)?;
        if (start..end).contains(&offset) {
            return (kind != 15).then_some(line);
        }
        while at < table.len() && table[at] & 0x80 == 0 {
            at += 1;
        }
    }
    None
}

/// An unsigned varint of 6-bit groups, low first, bit 6 meaning "more": (value, bytes used).
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 63) << (6 * i);
        if byte & 64 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table as CPython 3.11 writes it for
    ///     def f(x):        # line 1
    ///         y = x + 1    # line 2
    ///         return y     # line 3
    /// (RESUME on line 1; two instructions on line 2; one on line 3; then a no-line entry).
    #[test]
    fn lines_from_a_location_table() {
        let table = [
            0x80 | (10 << 3),
            0,
            0, // 1 unit, ONE_LINE0 (line 1), columns
            0x80 | (11 << 3) | 1,
            4,
            9, // 2 units, ONE_LINE1 (line 2)
            0x80 | (13 << 3),
            2,                // 1 unit, NO_COLUMNS, delta +1 (varint 2)
            0x80 | (15 << 3), // 1 unit, no line
        ];
        assert_eq!(line_at(&table, 1, -2), Some(1), "not started");
        assert_eq!(line_at(&table, 1, 0), Some(1));
        assert_eq!(line_at(&table, 1, 2), Some(2));
        assert_eq!(line_at(&table, 1, 4), Some(2));
        assert_eq!(line_at(&table, 1, 6), Some(3));
        assert_eq!(line_at(&table, 1, 8), None, "an instruction without a line");
        assert_eq!(line_at(&table, 1, 10), None, "past the end");
    }

    /// `co_lnotab` of 3.8 for a function on lines 1 to 4 whose line 3 is a blank: bytes 0-3 on
    /// line 2, 4-11 on line 4 (`dis.findlinestarts` gives (0, 2), (4, 4)).
    #[test]
    fn lines_from_an_lnotab() {
        let table = [0, 1, 4, 2];
        assert_eq!(line_at_lnotab(&table, 1, 0), 2);
        assert_eq!(line_at_lnotab(&table, 1, 2), 2);
        assert_eq!(line_at_lnotab(&table, 1, 4), 4);
        assert_eq!(line_at_lnotab(&table, 1, 10), 4);
        assert_eq!(line_at_lnotab(&table, 1, -1), 1, "not started");
    }

    /// 3.10's table for the same function, with a stretch without a line at bytes 8-9.
    #[test]
    fn lines_from_a_310_line_table() {
        let table = [4, 1, 4, 2, 2, 0x80, 2, 0];
        assert_eq!(line_at_310(&table, 1, -2), Some(1), "not started");
        assert_eq!(line_at_310(&table, 1, 0), Some(2));
        assert_eq!(line_at_310(&table, 1, 6), Some(4));
        assert_eq!(line_at_310(&table, 1, 8), None, "no line");
        assert_eq!(line_at_310(&table, 1, 10), Some(4), "the line after a gap");
        assert_eq!(line_at_310(&table, 1, 12), None, "past the end");
    }

    #[test]
    fn signed_varints() {
        assert_eq!(varint(&[2]), Some((2, 1)));
        assert_eq!(varint(&[0x40 | 1, 1]), Some((1 | (1 << 6), 2)));
        assert_eq!(varint(&[0x40]), None, "cut short");
    }
}
