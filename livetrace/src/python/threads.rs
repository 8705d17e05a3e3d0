//! Python's own names for its threads ("MainThread", `threading.Thread(name=...)`), for
//! `--per-thread`. The `threading` module keeps every live Thread in its `_active` dict; each
//! Thread holds its name in `_name` and its tid in `_native_id`. They are read from outside, as
//! py-spy reads them: `sys.modules` -> `threading` -> `_active` -> each Thread's attributes, which
//! means walking CPython's dicts, whose layout changed in 3.11 and whose instance attributes moved
//! out of the dict in 3.11, 3.12 and 3.13 (docs/python.md).

use std::collections::HashMap;

use super::process::Interpreter;
use crate::proc;

/// Most entries read of one dict, and most interpreters: bounds against a pointer gone astray.
const MAX_ENTRIES: u64 = 1 << 15;
const MAX_INTERPRETERS: usize = 64;

// The same in 3.8 to 3.13 (x86-64), from `offsetof()` against each version's headers.
/// `PyObject.ob_type`.
const OB_TYPE: u64 = 8;
/// `PyTypeObject.tp_basicsize`, `.tp_flags`, `.tp_dictoffset`.
const TYPE_BASICSIZE: u64 = 32;
const TYPE_FLAGS: u64 = 168;
const TYPE_DICTOFFSET: u64 = 288;
/// `PyDictObject.ma_keys`, `.ma_values`.
const DICT_KEYS: u64 = 32;
const DICT_VALUES: u64 = 40;
/// `PyModuleObject.md_dict`.
const MODULE_DICT: u64 = 16;
/// `PyLongObject`: its size (`ob_size`, or 3.12's `lv_tag`), then 30-bit digits.
const LONG_SIZE: u64 = 16;
const LONG_DIGITS: u64 = 24;
/// An instance's dict pointer, before the object (3.11+, `MANAGED_DICT_OFFSET`): in 3.11 its
/// split values are one word further back, in 3.12 the same word holds them tagged.
const MANAGED_DICT: u64 = 24;
const MANAGED_VALUES_311: u64 = 32;

/// `tp_flags` bits.
const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
const TPFLAGS_LONG_SUBCLASS: u64 = 1 << 24;
const TPFLAGS_UNICODE_SUBCLASS: u64 = 1 << 28;

/// The names of the process's Python threads, by tid as the kernel numbers them (`tasks` maps
/// the process's own numbering to it). Threads not started by `threading` (or not yet in
/// `_active`) are left out; a process that never imported `threading` has none.
pub fn thread_names(interpreter: &Interpreter, tasks: &HashMap<u32, u32>) -> HashMap<u32, String> {
    let objects = Objects { interpreter };
    let mut names = HashMap::new();
    let layout = &interpreter.layout;
    let mut interp =
        interpreter.read_u64(interpreter.runtime.wrapping_add(layout.interpreters_head));
    for _ in 0..MAX_INTERPRETERS {
        let Some(at) = interp.filter(|&a| a != 0) else {
            break;
        };
        for (own_tid, name) in objects.threads_of(at).unwrap_or_default() {
            if let Some(&tid) = tasks.get(&own_tid) {
                names.insert(tid, crate::names::sanitized(&name));
            }
        }
        interp = interpreter.read_u64(at.wrapping_add(layout.interpreter_next));
    }
    names
}

/// Reading objects of one interpreter's version.
struct Objects<'a> {
    interpreter: &'a Interpreter,
}

impl Objects<'_> {
    /// (own tid, name) of each Thread in `threading._active` of interpreter state `interp`.
    fn threads_of(&self, interp: u64) -> Option<Vec<(u32, String)>> {
        let modules = self.u64(interp.wrapping_add(self.interpreter.layout.modules))?;
        let threading = self.lookup(&self.dict(modules)?, "threading")?;
        let globals = self.dict(self.u64(threading.wrapping_add(MODULE_DICT))?)?;
        let active = self.dict(self.lookup(&globals, "_active")?)?;
        let threads = active.iter().filter_map(|&(_, thread)| {
            let attributes = self.attributes(thread)?;
            let tid = self.small_int(self.lookup(&attributes, "_native_id")?)?;
            let name = self.lookup(&attributes, "_name")?;
            if !self.has_type_flag(name, TPFLAGS_UNICODE_SUBCLASS)? {
                return None;
            }
            Some((u32::try_from(tid).ok()?, self.interpreter.read_str(name)?))
        });
        Some(threads.collect())
    }

    /// The value under the `str` key `text` among `entries`.
    fn lookup(&self, entries: &[(u64, u64)], text: &str) -> Option<u64> {
        entries
            .iter()
            .find(|(key, _)| self.str_is(*key, text))
            .map(|&(_, value)| value)
    }

    /// Whether the object at `address` is the compact ASCII string `text`, in one read.
    fn str_is(&self, address: u64, text: &str) -> bool {
        let data = self.interpreter.layout.ascii_data as usize;
        let Some(bytes) = proc::memory::read(self.interpreter.pid, address, data + text.len())
        else {
            return false;
        };
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .map(|b| b.try_into().map(u64::from_le_bytes))
        };
        let state = bytes.get(32).copied().unwrap_or_default();
        let compact_ascii = state & (1 << 5) != 0 && state & (1 << 6) != 0;
        matches!(word(16), Some(Ok(len)) if len == text.len() as u64)
            && compact_ascii
            && bytes.get(data..) == Some(text.as_bytes())
    }

    /// The (key, value) pairs of the dict object at `dict`.
    fn dict(&self, dict: u64) -> Option<Vec<(u64, u64)>> {
        if dict == 0 {
            return None;
        }
        let keys = self.u64(dict.wrapping_add(DICT_KEYS))?;
        let values = self.u64(dict.wrapping_add(DICT_VALUES))?;
        // A split dict keeps its values apart from its (shared) keys; 3.13's values array has
        // a header of one word.
        let header = if self.minor() >= 13 { 8 } else { 0 };
        self.entries(keys, (values != 0).then(|| values.wrapping_add(header)))
    }

    /// The (key, value) pairs of a dict keys object, with the values from `values` (a split
    /// dict's array, by entry index) or from the entries. Deleted entries are skipped.
    fn entries(&self, keys: u64, values: Option<u64>) -> Option<Vec<(u64, u64)>> {
        let header = proc::memory::read(self.interpreter.pid, keys, 40)?;
        let word = |at: usize| Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?));
        // Each entry is (hash, key, value), or (key, value) in the string-keyed tables of 3.11+.
        let (count, table, entry, key_at) = if self.minor() < 11 {
            // dk_refcnt, dk_size, dk_lookup, dk_usable, dk_nentries, then the indices: one per
            // slot, as wide as the table needs.
            let size = word(8)?;
            let width = match size {
                0..=0xff => 1,
                0x100..=0xffff => 2,
                0x1_0000..=0xffff_ffff => 4,
                _ => 8,
            };
            (
                word(32)?,
                keys.wrapping_add(size.checked_mul(width)?.checked_add(40)?),
                24,
                8,
            )
        } else {
            // dk_refcnt, dk_log2_size, dk_log2_index_bytes, dk_kind, dk_version, dk_usable,
            // dk_nentries, then the indices.
            let index_bytes = 1u64.checked_shl(u32::from(*header.get(9)?))?;
            let general = *header.get(10)? == 0;
            let (entry, key_at) = if general { (24, 8) } else { (16, 0) };
            (
                word(24)?,
                keys.wrapping_add(32 + index_bytes),
                entry,
                key_at,
            )
        };
        let count = count.min(MAX_ENTRIES) as usize;
        let table = proc::memory::read(self.interpreter.pid, table, count * entry)?;
        let values = match values {
            Some(at) => Some(proc::memory::read(self.interpreter.pid, at, count * 8)?),
            None => None,
        };
        let word_in = |bytes: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        let pairs = (0..count).filter_map(|i| {
            let key = word_in(&table, i * entry + key_at)?;
            let value = match &values {
                Some(values) => word_in(values, i * 8)?,
                None => word_in(&table, i * entry + key_at + 8)?,
            };
            (key != 0 && value != 0).then_some((key, value))
        });
        Some(pairs.collect())
    }

    /// The attributes of an instance of a class defined in Python: its `__dict__`, or, in
    /// 3.11+, the values it keeps without one, under its class's shared keys.
    fn attributes(&self, object: u64) -> Option<Vec<(u64, u64)>> {
        let class = self.u64(object.wrapping_add(OB_TYPE))?;
        let flags = self.u64(class.wrapping_add(TYPE_FLAGS))?;
        if self.minor() < 11 || flags & TPFLAGS_MANAGED_DICT == 0 {
            let offset = self.u64(class.wrapping_add(TYPE_DICTOFFSET))? as i64;
            if offset <= 0 {
                return None;
            }
            return self.dict(self.u64(object.wrapping_add(offset as u64))?);
        }
        // `PyHeapTypeObject.ht_cached_keys`: the keys a class's instances share.
        let cached_keys =
            || self.u64(class.wrapping_add(if self.minor() >= 12 { 880 } else { 872 }));
        let dict = self.u64(object.wrapping_sub(MANAGED_DICT))?;
        match self.minor() {
            11 => match self.u64(object.wrapping_sub(MANAGED_VALUES_311))? {
                0 => self.dict(dict),
                values => self.entries(cached_keys()?, Some(values)),
            },
            // Values, tagged by their low bit (stored one byte before them), or a dict.
            12 if dict & 1 == 1 => self.entries(cached_keys()?, Some(dict.wrapping_add(1))),
            12 => self.dict(dict),
            // 3.13: a dict once one was asked for; before that the values follow the object,
            // with a header whose fourth byte says whether they are in use.
            _ if dict != 0 => self.dict(dict),
            _ if flags & TPFLAGS_INLINE_VALUES != 0 => {
                let values = object.wrapping_add(self.u64(class.wrapping_add(TYPE_BASICSIZE))?);
                let valid = proc::memory::read(self.interpreter.pid, values.wrapping_add(3), 1)?;
                if valid.first() != Some(&1) {
                    return None;
                }
                self.entries(cached_keys()?, Some(values.wrapping_add(8)))
            }
            _ => None,
        }
    }

    /// The value of an `int` object of at most two digits (60 bits).
    fn small_int(&self, object: u64) -> Option<i64> {
        if !self.has_type_flag(object, TPFLAGS_LONG_SUBCLASS)? {
            return None;
        }
        let size = self.u64(object.wrapping_add(LONG_SIZE))?;
        let (digits, negative) = if self.minor() >= 12 {
            // lv_tag: the number of digits above three bits of sign (2: negative).
            (size >> 3, size & 3 == 2)
        } else {
            ((size as i64).unsigned_abs(), (size as i64) < 0)
        };
        if digits > 2 {
            return None;
        }
        let bytes = proc::memory::read(
            self.interpreter.pid,
            object.wrapping_add(LONG_DIGITS),
            digits as usize * 4,
        )?;
        let value = bytes.chunks_exact(4).enumerate().fold(0i64, |sum, (i, c)| {
            sum | (i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) << (30 * i))
        });
        Some(if negative { -value } else { value })
    }

    /// Whether the type of the object at `object` has `flag` (an `int` or `str` subclass, say).
    fn has_type_flag(&self, object: u64, flag: u64) -> Option<bool> {
        let class = self.u64(object.wrapping_add(OB_TYPE))?;
        Some(self.u64(class.wrapping_add(TYPE_FLAGS))? & flag != 0)
    }

    fn u64(&self, address: u64) -> Option<u64> {
        self.interpreter.read_u64(address)
    }

    fn minor(&self) -> u32 {
        self.interpreter.layout.minor
    }
}
