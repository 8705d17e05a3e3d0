//! The recording's own clock: the wall clock read once at the start, plus the monotonic time
//! elapsed since. Buckets are placed on it, so that a step of the system clock (an NTP step, a
//! date set by hand) can neither reorder nor overlap them nor cut `--keep` short; dumps name
//! their windows in it, and say so when the system clock has moved away from it.

use std::time::{Duration, Instant, SystemTime};

/// How far the system clock may wander from the recording's before a dump says so.
const DRIFT_NOTED: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    wall: SystemTime,
    mono: Instant,
}

impl Timeline {
    pub fn start() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The recording's time at a monotonic instant (not before its start).
    pub fn at(&self, instant: Instant) -> SystemTime {
        self.wall + instant.saturating_duration_since(self.mono)
    }

    pub fn now(&self) -> SystemTime {
        self.at(Instant::now())
    }

    /// A note for the footer when the system clock is more than a second away from the
    /// recording's (it was stepped since the start).
    pub fn drift_note(&self) -> Option<String> {
        let (system, ours) = (SystemTime::now(), self.now());
        let (way, by) = match system.duration_since(ours) {
            Ok(ahead) => ("ahead of", ahead),
            Err(behind) => ("behind", behind.duration()),
        };
        (by > DRIFT_NOTED).then(|| {
            format!(
                "the system clock is {:.1} s {way} the recording's (the wall clock at its start \
                 plus the time elapsed since; it was stepped meanwhile): the times here are the \
                 recording's",
                by.as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stepped_system_clock_is_noted_and_buckets_stay_on_the_recordings() {
        let now = Timeline::start();
        assert_eq!(now.drift_note(), None);
        // As if the system clock had been stepped 300 s forward since the start.
        let stepped = Timeline {
            wall: now.wall - Duration::from_secs(300),
            mono: now.mono,
        };
        let note = stepped.drift_note().unwrap();
        assert!(
            note.starts_with("the system clock is 300.0 s ahead of"),
            "{note}"
        );
        let later = now.mono + Duration::from_millis(2500);
        assert_eq!(
            stepped
                .at(later)
                .duration_since(stepped.at(now.mono))
                .unwrap(),
            Duration::from_millis(2500)
        );
        // Backward: a minute behind.
        let back = Timeline {
            wall: now.wall + Duration::from_secs(60),
            mono: now.mono,
        };
        assert!(back.drift_note().unwrap().contains("60.0 s behind"));
    }
}
