//! How much stack to copy for each thread (`--unwind dwarf`): learnt from how deep its earlier
//! stacks went.

use std::collections::HashMap;

use aya::maps::MapData;
use livetrace_common::unwind::{MAX_STACK_COPY, UnwindSampleHeader};

use super::SampleKey;

/// Why a stack is cut short when its copy was the stack copy's full size.
pub(super) const COPY_TOO_SMALL: &str = "stack copy too small (raise --stack-copy-size)";
/// The same when that size is the largest there is: nothing to raise.
const DEEPER_THAN_ANY_COPY: &str = "stack deeper than the largest stack copy (16 KiB): its \
     outermost frames are missing";
/// Why it is cut short when the copy was sized from the thread's earlier stacks.
const COPY_SIZED_TOO_SMALL: &str =
    "stack deeper than this thread's earlier ones (its next copies are whole)";
/// Headroom above the deepest stack a thread has needed so far.
const COPY_MARGIN: u32 = 1024;

/// `--unwind dwarf`: how much stack to copy at each thread's next sample or switch-out. Most
/// stacks need a few hundred bytes to a few KiB of the up to 16 KiB a whole copy takes
/// (everything up to the stack's top: the environment, a thread's TLS), and the copy is most of
/// the cost of a sample or switch. A thread's first copy is whole; after each complete unwind its size is the deepest
/// stack it has needed plus [`COPY_MARGIN`], never shrinking; a stack cut short by that size is
/// counted as such, and the thread's copies are whole again once that is seen here (the blocks
/// it starts within the few milliseconds before are cut short too, and counted alike).
pub struct CopyLimits {
    pub(super) map: aya::maps::HashMap<MapData, u32, u32>,
    whole: u32,
    pub(super) set: HashMap<u32, u32>,
}

impl CopyLimits {
    pub fn new(map: aya::maps::HashMap<MapData, u32, u32>, whole: u32) -> Self {
        Self {
            map,
            whole,
            set: HashMap::new(),
        }
    }

    pub(super) fn learn(&mut self, header: &UnwindSampleHeader, key: &mut SampleKey, used: usize) {
        let current = self.set.get(&header.tid).copied();
        let new = match key.cut_short.as_deref() {
            Some(COPY_TOO_SMALL) if header.stack_len < self.whole && current.is_some() => {
                key.cut_short = Some(COPY_SIZED_TOO_SMALL.into());
                self.whole
            }
            Some(COPY_TOO_SMALL) if self.whole >= MAX_STACK_COPY => {
                key.cut_short = Some(DEEPER_THAN_ANY_COPY.into());
                return;
            }
            None => {
                let needed = u32::try_from(used).unwrap_or(u32::MAX);
                needed
                    .saturating_add(COPY_MARGIN)
                    .next_multiple_of(256)
                    .min(self.whole)
            }
            Some(_) => return,
        };
        if current.is_some_and(|c| c >= new) {
            return;
        }
        // A full map leaves the thread's copies whole: nothing is lost, only time.
        if self.map.insert(header.tid, new, 0).is_ok() {
            self.set.insert(header.tid, new);
        }
    }
}
