//! What a stack id in a [`StackKey`](livetrace_common::stacks::StackKey) stands for. The BPF
//! programs store an id, a negated errno or a sentinel in one `i32`; [`StackRef::of`] reads it
//! once, so that nothing else decodes sentinels.

use livetrace_common::stacks::{
    STACK_ID_NOT_COLLECTED, STACK_ID_RECOVERED, STACK_ID_UNWOUND, stack_errno,
};

/// Why a stack is missing when its copy could not be sent to the unwinding thread.
pub(super) const RING_FULL: &str = "stack copy lost to the full unwind ring buffer";

/// A stack id, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackRef {
    /// A stack in the kernel's stack-trace map, or (at or above
    /// [`FIRST_SYNTHETIC_ID`](crate::unwind::FIRST_SYNTHETIC_ID)) one the unwinder made.
    Id(u32),
    /// The walk or the copy failed, with this errno ([`stack_errno`]).
    Lost(i32),
    /// Not asked for (`-U`, `-K`), or a sample in user mode has no kernel stack. Not a loss.
    NotCollected,
    /// Recovered from /proc (offcpu: a thread blocked since before the capture).
    Recovered,
    /// Sent to user space as a stack copy, to be unwound there.
    Unwound,
}

impl StackRef {
    pub fn of(raw: i32) -> Self {
        match raw {
            STACK_ID_NOT_COLLECTED => Self::NotCollected,
            STACK_ID_RECOVERED => Self::Recovered,
            STACK_ID_UNWOUND => Self::Unwound,
            id if id >= 0 => Self::Id(id as u32),
            errno => Self::Lost(-errno),
        }
    }

    /// The id, for a stack stored in a map.
    pub fn id(self) -> Option<u32> {
        match self {
            Self::Id(id) => Some(id),
            _ => None,
        }
    }

    /// Whether the unwinding thread made this stack (`--unwind dwarf`), not the kernel.
    pub fn is_synthetic(self) -> bool {
        self.id()
            .is_some_and(|id| id >= crate::unwind::FIRST_SYNTHETIC_ID)
    }

    /// Why a stack that should be there is not (`None` for a map id whose stack was evicted).
    pub fn loss(self) -> &'static str {
        match self {
            Self::Lost(stack_errno::EEXIST) => "hash collision in the stack map",
            Self::Lost(stack_errno::ENOMEM) => "stack map full",
            Self::Lost(stack_errno::EFAULT) => "walk failed (EFAULT)",
            Self::Lost(stack_errno::ENOSPC) => RING_FULL,
            Self::Lost(_) => "walk failed",
            Self::Recovered => "not recoverable from /proc",
            Self::Id(_) => "evicted from the stack map",
            Self::NotCollected | Self::Unwound => "not collected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind_of_id() {
        assert_eq!(StackRef::of(7), StackRef::Id(7));
        assert_eq!(
            StackRef::of(-stack_errno::EEXIST),
            StackRef::Lost(stack_errno::EEXIST)
        );
        assert_eq!(StackRef::of(STACK_ID_NOT_COLLECTED), StackRef::NotCollected);
        assert_eq!(StackRef::of(STACK_ID_RECOVERED), StackRef::Recovered);
        assert_eq!(StackRef::of(STACK_ID_UNWOUND), StackRef::Unwound);
        assert!(StackRef::of(0x4000_0001).is_synthetic() && !StackRef::of(5).is_synthetic());
        assert_eq!(
            StackRef::of(-stack_errno::ENOSPC).loss(),
            "stack copy lost to the full unwind ring buffer"
        );
    }
}
