//! The count map the stack programs add to (stack key -> samples or nanoseconds), which they
//! reach through a one-slot map of maps, `STACK_COUNTS` (see `livetrace-ebpf`'s `CountsSlot`).
//! A capture reads the map in the slot in place; `record` puts a fresh one in at each cut and
//! takes the old one whole.

use anyhow::Context as _;
use aya::{
    Ebpf, Pod,
    maps::{MapData, MapError, of_maps::ArrayOfMaps},
};

use super::{map_mut, map_ref};

/// One count map, created here at the size asked for (the object's is only a template).
pub type Counts<K> = aya::maps::HashMap<MapData, K, u64>;

/// Puts a new, empty count map of `entries` into `slot`, and returns the map it replaces
/// (`None` the first time). The kernel returns from the update only after every program run
/// that may still hold the old map has ended (an RCU grace period, milliseconds), so the map
/// returned is complete and nothing adds to it any more: no count straddles the swap.
pub fn replace<K: Pod>(
    bpf: &mut Ebpf,
    slot: &str,
    entries: u32,
) -> anyhow::Result<Option<Counts<K>>> {
    let mut outer: ArrayOfMaps<&mut MapData, Counts<K>> =
        ArrayOfMaps::try_from(map_mut(bpf, slot)?)?;
    let old = match outer.get(&0, 0) {
        Ok(old) => Some(old),
        Err(MapError::KeyNotFound) => None,
        Err(err) => return Err(err).with_context(|| format!("failed to read {slot}'s slot")),
    };
    let fresh = Counts::<K>::create(entries, 0)
        .with_context(|| format!("failed to create a count map of {entries} entries"))?;
    outer
        .set(0, &fresh, 0)
        .with_context(|| format!("failed to put a new count map in {slot}"))?;
    Ok(old)
}

/// The count map in `slot` now, to read in place while the programs go on adding to it.
pub fn current<K: Pod>(bpf: &Ebpf, slot: &str) -> anyhow::Result<Counts<K>> {
    let outer: ArrayOfMaps<&MapData, Counts<K>> = ArrayOfMaps::try_from(map_ref(bpf, slot)?)?;
    outer
        .get(&0, 0)
        .with_context(|| format!("failed to open the count map in {slot}"))
}

/// Every entry of a count map.
pub fn entries<K: Pod>(counts: &Counts<K>) -> anyhow::Result<Vec<(K, u64)>> {
    counts
        .iter()
        .collect::<Result<_, _>>()
        .context("failed to read a count map")
}
