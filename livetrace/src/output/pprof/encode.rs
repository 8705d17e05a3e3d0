//! A stack profile into pprof's messages: interned strings, one mapping per module, one
//! location per address (its inlined functions as lines), one function per name and file.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    Function, Label, Line, Location, Mapping, PROCESS_LABEL, Profile, Sample, THREAD_LABEL,
    ValueType,
};
use crate::{
    model::{Frame, FrameKind, KERNEL_MODULE, StackProfile, WeightUnit, WeightedStack},
    output::footer,
};

pub fn encode(profile: &StackProfile) -> Profile {
    let mut encoder = Encoder::default();
    encoder.strings.get("");
    encoder.header(profile);
    encoder.mappings(profile);
    for stack in &profile.stacks {
        encoder.sample(profile, stack);
    }
    encoder.out.string_table = encoder.strings.table;
    encoder.out
}

/// A location's identity: where it is and the functions (outermost first) at it.
type LocationKey = (Option<Arc<str>>, Option<u64>, Vec<(String, Option<u32>)>);

#[derive(Default)]
struct Encoder {
    out: Profile,
    strings: Strings,
    mapping_ids: HashMap<Arc<str>, u64>,
    functions: HashMap<(String, Option<Arc<str>>), u64>,
    locations: HashMap<LocationKey, u64>,
}

impl Encoder {
    fn value_type(&mut self, r#type: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.strings.get(r#type),
            unit: self.strings.get(unit),
        }
    }

    /// Sample types, period, times and the data-quality footer as comments.
    fn header(&mut self, profile: &StackProfile) {
        match profile.unit {
            WeightUnit::Samples => {
                let samples = self.value_type("samples", "count");
                self.out.sample_type.push(samples);
                if let Some(period) = profile.period_ns {
                    let cpu = self.value_type("cpu", "nanoseconds");
                    self.out.sample_type.push(cpu.clone());
                    self.out.period_type = Some(cpu);
                    self.out.period = period as i64;
                    self.out.default_sample_type = self.strings.get("cpu");
                }
            }
            WeightUnit::Microseconds => {
                let off_cpu = self.value_type("off_cpu", "nanoseconds");
                self.out.sample_type.push(off_cpu.clone());
                self.out.period_type = Some(off_cpu);
                self.out.period = 1;
            }
        }
        self.out.duration_nanos = profile.quality.duration.as_nanos() as i64;
        self.out.time_nanos = profile.quality.started_unix_ns.unwrap_or(0) as i64;
        for line in footer::text(profile).lines() {
            let comment = self.strings.get(line.trim());
            self.out.comment.push(comment);
        }
    }

    /// One mapping per module, spanning the addresses seen in it.
    fn mappings(&mut self, profile: &StackProfile) {
        let mut ranges: BTreeMap<Arc<str>, (u64, u64)> = BTreeMap::new();
        for frame in profile.stacks.iter().flat_map(|s| &s.frames) {
            if let (Some(module), Some(address)) = (&frame.module, frame.address) {
                let range = ranges.entry(module.clone()).or_insert((address, address));
                range.0 = range.0.min(address);
                range.1 = range.1.max(address);
            }
        }
        for (i, (module, (low, high))) in ranges.iter().enumerate() {
            let id = i as u64 + 1;
            self.mapping_ids.insert(module.clone(), id);
            let kernel = &**module == KERNEL_MODULE;
            let mapping = Mapping {
                id,
                // User addresses are the module's own (ELF virtual) addresses, so the mapping
                // spans the module from 0; kernel addresses are absolute.
                memory_start: if kernel { *low } else { 0 },
                memory_limit: high + 1,
                file_offset: 0,
                filename: self.strings.get(module),
                build_id: profile
                    .build_ids
                    .get(module)
                    .map_or(0, |id| self.strings.get(id)),
                has_functions: true,
                has_filenames: !kernel,
                has_line_numbers: !kernel,
                has_inline_frames: !kernel,
            };
            self.out.mapping.push(mapping);
        }
    }

    /// One sample: the process and thread frames as labels, the code frames as locations.
    fn sample(&mut self, profile: &StackProfile, stack: &WeightedStack) {
        let mut labels = Vec::new();
        // Groups of frames from one address, root first.
        let mut groups: Vec<Vec<&Frame>> = Vec::new();
        for frame in &stack.frames {
            let key = match frame.kind {
                FrameKind::Process => PROCESS_LABEL,
                FrameKind::Thread => THREAD_LABEL,
                _ => {
                    match groups.last_mut() {
                        Some(group) if frame.inlined => group.push(frame),
                        _ => groups.push(vec![frame]),
                    }
                    continue;
                }
            };
            labels.push(Label {
                key: self.strings.get(key),
                str: self.strings.get(&frame.name),
                ..Label::default()
            });
        }
        let location_id = groups.iter().rev().map(|g| self.location(g)).collect();
        let weight = stack.weight as i64;
        let value = match (profile.unit, profile.period_ns) {
            (WeightUnit::Samples, Some(period)) => {
                vec![weight, weight.saturating_mul(period as i64)]
            }
            (WeightUnit::Samples, None) => vec![weight],
            (WeightUnit::Microseconds, _) => vec![weight.saturating_mul(1000)],
        };
        self.out.sample.push(Sample {
            location_id,
            value,
            label: labels,
        });
    }

    /// The location of a group of frames at one address (outermost first), made once.
    fn location(&mut self, group: &[&Frame]) -> u64 {
        let head = group[0];
        let key: LocationKey = (
            head.module.clone(),
            head.address,
            group.iter().map(|f| (f.name.clone(), f.line)).collect(),
        );
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let line = group
            .iter()
            .rev()
            .map(|frame| Line {
                function_id: self.function(frame),
                line: frame.line.map_or(0, i64::from),
                column: 0,
            })
            .collect();
        let mapping_id = head
            .module
            .as_ref()
            .and_then(|m| self.mapping_ids.get(m))
            .copied()
            .unwrap_or(0);
        self.out.location.push(Location {
            id,
            mapping_id,
            address: head.address.unwrap_or(0),
            line,
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    /// The function of a frame's name and source file, made once.
    fn function(&mut self, frame: &Frame) -> u64 {
        let key = (frame.name.clone(), frame.file.clone());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.strings.get(&frame.name);
        let filename = frame.file.as_deref().map_or(0, |f| self.strings.get(f));
        self.out.function.push(Function {
            id,
            name,
            system_name: name,
            filename,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }
}

/// Interns strings; index 0 is the empty string, as the format requires (the encoder adds it
/// first).
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}
