//! `-i`: a histogram for every interval, printed (or kept for JSON) as it ends.

use std::time::Duration;

use crate::{
    histogram::{Histogram, Interval},
    output::histogram_text,
};

use super::maps::Maps;

/// Prints (or keeps, for JSON) a histogram of every `-i` interval as it ends.
pub(super) struct IntervalClock {
    every: Option<Duration>,
    last_end: Duration,
    pub(super) last: Histogram,
    pub(super) done: Vec<Interval>,
}

impl IntervalClock {
    pub(super) fn new(every: Option<Duration>) -> Self {
        Self {
            every,
            last_end: Duration::ZERO,
            last: Histogram::default(),
            done: Vec::new(),
        }
    }

    pub(super) fn tick(
        &mut self,
        maps: &mut Maps,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let Some(every) = self.every else {
            return Ok(());
        };
        // The run loop ticks every second; an interval ends on the first tick at or after it.
        if now + Duration::from_millis(100) < self.last_end + every {
            return Ok(());
        }
        let total = maps.histogram()?;
        self.close(maps, &total, now, function, json)
    }

    /// The last, possibly shorter, interval.
    pub(super) fn finish(
        &mut self,
        maps: &mut Maps,
        total: &Histogram,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        if self.every.is_none()
            || (total.count() == self.last.count()
                && now < self.last_end + Duration::from_millis(200))
        {
            return Ok(());
        }
        self.close(maps, total, now, function, json)
    }

    pub(super) fn close(
        &mut self,
        maps: &mut Maps,
        total: &Histogram,
        now: Duration,
        function: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let (min, max) = maps.take_window()?;
        let interval = Interval {
            start: self.last_end,
            end: now,
            histogram: total.since(&self.last, min, max),
        };
        if !json {
            crate::out!("{}\n", histogram_text::interval_text(function, &interval));
        }
        self.last = total.clone();
        self.last_end = now;
        self.done.push(interval);
        Ok(())
    }
}
