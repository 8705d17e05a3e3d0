//! pprof's messages back into a stack profile, for `livetrace diff`. Every index is checked:
//! a malformed file is an error that says what is wrong, never a panic.

use std::{collections::HashMap, sync::Arc};

use super::{Function, Location, PROCESS_LABEL, Profile, ReadError, Sample, THREAD_LABEL};
use crate::model::{Frame, FrameKind, KERNEL_MODULE, StackProfile, WeightUnit, WeightedStack};

pub fn decode(p: &Profile) -> Result<StackProfile, ReadError> {
    if p.string_table.first().is_none_or(|s| !s.is_empty()) {
        return Err(bad("the string table does not start with the empty string"));
    }
    let decoder = Decoder::new(p)?;
    let stacks = p
        .sample
        .iter()
        .map(|sample| decoder.stack(sample))
        .collect::<Result<_, _>>()?;
    let unit = decoder.unit;
    let mut profile = StackProfile {
        title: String::new(),
        unit,
        period_ns: (p.period > 0 && unit == WeightUnit::Samples).then_some(p.period as u64),
        stacks,
        quality: Default::default(),
        build_ids: Default::default(),
    };
    profile.quality.duration = std::time::Duration::from_nanos(p.duration_nanos.max(0) as u64);
    profile.normalize();
    Ok(profile)
}

fn bad(what: impl Into<String>) -> ReadError {
    ReadError::Malformed(what.into())
}

/// The profile's tables by id, and which sample value is read.
struct Decoder<'p> {
    p: &'p Profile,
    /// Which of each sample's values is the weight, and how many there are.
    value_index: usize,
    value_count: usize,
    unit: WeightUnit,
    /// Nanoseconds become microseconds.
    divisor: u64,
    mappings: HashMap<u64, &'p str>,
    functions: HashMap<u64, &'p Function>,
    locations: HashMap<u64, &'p Location>,
    label_keys: [(Option<usize>, FrameKind); 2],
}

impl<'p> Decoder<'p> {
    fn new(p: &'p Profile) -> Result<Self, ReadError> {
        let string = |i| string(p, i);
        if p.sample_type.is_empty() {
            return Err(bad("no sample types"));
        }
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| Ok((string(t.r#type)?, string(t.unit)?)))
            .collect::<Result<_, ReadError>>()?;
        // A count if there is one, else the default type, else the last.
        let default = string(p.default_sample_type)?;
        let value_index = types
            .iter()
            .position(|(_, unit)| *unit == "count")
            .or_else(|| {
                types
                    .iter()
                    .position(|(t, _)| !default.is_empty() && *t == default)
            })
            .unwrap_or(types.len() - 1);
        let (unit, divisor) = match types[value_index].1 {
            "nanoseconds" => (WeightUnit::Microseconds, 1000),
            "microseconds" => (WeightUnit::Microseconds, 1),
            _ => (WeightUnit::Samples, 1),
        };
        let mappings = p
            .mapping
            .iter()
            .map(|m| Ok((m.id, string(m.filename)?)))
            .collect::<Result<_, ReadError>>()?;
        let key = |label| p.string_table.iter().position(|s| s == label);
        Ok(Self {
            p,
            value_index,
            value_count: types.len(),
            unit,
            divisor,
            mappings,
            functions: p.function.iter().map(|f| (f.id, f)).collect(),
            locations: p.location.iter().map(|l| (l.id, l)).collect(),
            label_keys: [
                (key(PROCESS_LABEL), FrameKind::Process),
                (key(THREAD_LABEL), FrameKind::Thread),
            ],
        })
    }

    fn string(&self, i: i64) -> Result<&'p str, ReadError> {
        string(self.p, i)
    }

    /// One sample: its labels as root frames, then its locations root first.
    fn stack(&self, sample: &Sample) -> Result<WeightedStack, ReadError> {
        let value = *sample.value.get(self.value_index).ok_or_else(|| {
            bad(format!(
                "a sample has {} values for {} sample types",
                sample.value.len(),
                self.value_count
            ))
        })?;
        let mut frames = Vec::new();
        for (key, kind) in self.label_keys {
            let label = sample
                .label
                .iter()
                .find(|l| key.is_some_and(|k| l.key == k as i64) && l.str != 0);
            if let Some(label) = label {
                frames.push(Frame::new(kind, self.string(label.str)?));
            }
        }
        for id in sample.location_id.iter().rev() {
            self.location_frames(*id, &mut frames)?;
        }
        let weight = u64::try_from(value).unwrap_or(0) / self.divisor;
        Ok(WeightedStack { frames, weight })
    }

    /// A location's functions, outermost first; a location without any becomes one frame that
    /// names its module and address.
    fn location_frames(&self, id: u64, frames: &mut Vec<Frame>) -> Result<(), ReadError> {
        let location = self.locations.get(&id).ok_or_else(|| {
            bad(format!(
                "a sample refers to location {id}, which is missing"
            ))
        })?;
        let module = self.mappings.get(&location.mapping_id).copied();
        for (depth, line) in location.line.iter().rev().enumerate() {
            let function = self.functions.get(&line.function_id).ok_or_else(|| {
                bad(format!(
                    "location {id} refers to function {}, which is missing",
                    line.function_id
                ))
            })?;
            let name = self.string(function.name)?;
            let kind = if module == Some(KERNEL_MODULE) {
                FrameKind::Kernel
            } else if name.starts_with("[lost ") {
                FrameKind::Lost
            } else {
                FrameKind::User
            };
            let file = self.string(function.filename)?;
            frames.push(Frame {
                name: name.to_owned(),
                kind,
                module: module.filter(|m| !m.is_empty()).map(Arc::from),
                address: (location.address != 0).then_some(location.address),
                inlined: depth > 0,
                file: (!file.is_empty()).then(|| Arc::from(file)),
                line: u32::try_from(line.line).ok().filter(|&l| l > 0),
            });
        }
        if location.line.is_empty() {
            frames.push(Frame::new(
                FrameKind::User,
                format!("[{}+{:#x}]", module.unwrap_or("unknown"), location.address),
            ));
        }
        Ok(())
    }
}

fn string(p: &Profile, i: i64) -> Result<&str, ReadError> {
    usize::try_from(i)
        .ok()
        .and_then(|i| p.string_table.get(i))
        .map(String::as_str)
        .ok_or_else(|| bad(format!("string index {i} is outside the string table")))
}
