//! The count map the stack programs add to (stack key -> samples or nanoseconds), which they
//! reach through a one-slot map of maps, `STACK_COUNTS` (see `livetrace-ebpf`'s `CountsSlot`).
//! A capture reads the map in the slot in place; `record` puts a fresh one in at each cut and
//! takes the old one whole. The tool keeps the descriptor of the map in use: opening it again
//! from the slot (by id) would need CAP_SYS_ADMIN, which livetrace does not ask for.

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, of_maps::ArrayOfMaps},
};
use livetrace_common::stacks::{DEFAULT_STACK_STORAGE, STACK_COUNTS, StackKey};

use super::map_mut;

/// One count map, created here at the size asked for (the object's is only a template).
pub type Counts = aya::maps::HashMap<MapData, StackKey, u64>;

/// The count map in `STACK_COUNTS`'s slot, and the size of the ones put there.
pub struct CountSlot {
    current: Counts,
    entries: u32,
}

impl CountSlot {
    /// Puts a first count map of `entries` in the slot of a loaded object, before its programs
    /// are attached.
    pub fn fill(bpf: &mut Ebpf, entries: u32) -> anyhow::Result<Self> {
        Ok(Self {
            current: put(bpf, entries)?,
            entries,
        })
    }

    /// The map in use, to read in place while the programs go on adding to it.
    pub fn current(&self) -> &Counts {
        &self.current
    }

    /// Puts a new, empty count map in the slot and returns the one it replaces. The kernel
    /// returns from the update only after every program run that may still hold the old map
    /// has ended (an RCU grace period, milliseconds), so the map returned is complete and
    /// nothing adds to it any more: no count straddles the swap.
    pub fn swap(&mut self, bpf: &mut Ebpf) -> anyhow::Result<Counts> {
        let fresh = put(bpf, self.entries)?;
        Ok(std::mem::replace(&mut self.current, fresh))
    }
}

/// Creates a count map of `entries` and puts it in the slot.
fn put(bpf: &mut Ebpf, entries: u32) -> anyhow::Result<Counts> {
    let mut slot: ArrayOfMaps<&mut MapData, Counts> =
        ArrayOfMaps::try_from(map_mut(bpf, STACK_COUNTS)?)?;
    let counts = Counts::create(entries, 0)
        .with_context(|| format!("failed to create a count map of {entries} entries"))?;
    slot.set(0, &counts, 0).with_context(|| {
        // Before 5.10 the kernel takes only maps of the template's size into the slot.
        format!(
            "failed to put a count map of {entries} entries in STACK_COUNTS (kernels before \
             5.10 take only the default size: leave --stack-storage-size at {DEFAULT_STACK_STORAGE})"
        )
    })?;
    Ok(counts)
}

/// Every entry of a count map.
pub fn entries(counts: &Counts) -> anyhow::Result<Vec<(StackKey, u64)>> {
    counts
        .iter()
        .collect::<Result<_, _>>()
        .context("failed to read a count map")
}
