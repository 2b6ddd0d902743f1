//! No-progress detection for drift repair.
//!
//! Consul may store something other than what was written (it normalises values; a future
//! version may normalise more than the writer knows). Comparing raw values then finds a
//! difference on every pass, and each rewrite wakes the blocking query that starts the
//! next pass: a loop of writes that never converges. This module remembers, per object,
//! what the writer last wrote and what Consul held afterwards. When the same difference
//! comes back right after a rewrite, the object is *stalled*: it is not rewritten again
//! until the desired value or Consul's copy changes (a different content or index), and the
//! caller reports it. Real drift (someone changes the object later) moves the index, so it
//! is still repaired.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

/// A content fingerprint (within one process).
pub(crate) fn fingerprint(value: &impl serde::Serialize) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(value)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug)]
struct Attempt {
    desired: u64,
    /// Consul's content and index when last looked at.
    last: Option<(u64, u64)>,
    /// A write of `desired` succeeded since `last` was recorded.
    wrote: bool,
    stalled: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Write,
    Stalled,
}

#[derive(Debug, Default)]
pub(crate) struct Progress {
    objects: Mutex<HashMap<String, Attempt>>,
}

impl Progress {
    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempt>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An owned object holds `current` (at `index`) but `desired` is wanted: rewrite or not?
    pub(crate) fn before_rewrite(
        &self,
        target: &str,
        desired: u64,
        current: u64,
        index: u64,
    ) -> Verdict {
        let mut objects = self.objects();
        let Some(attempt) = objects.get_mut(target).filter(|a| a.desired == desired) else {
            objects.insert(
                target.to_string(),
                Attempt {
                    desired,
                    last: Some((current, index)),
                    wrote: false,
                    stalled: false,
                },
            );
            return Verdict::Write;
        };
        match attempt.last {
            // Nothing happened since the last look (e.g. a write that lost its CAS).
            Some((_, seen)) if seen == index && attempt.stalled => Verdict::Stalled,
            Some((seen, _)) if seen == current && attempt.wrote => {
                attempt.last = Some((current, index));
                attempt.stalled = true;
                Verdict::Stalled
            }
            _ => {
                attempt.last = Some((current, index));
                attempt.wrote = false;
                attempt.stalled = false;
                Verdict::Write
            }
        }
    }

    /// `desired` was just written (created or updated).
    pub(crate) fn written(&self, target: &str, desired: u64) {
        let mut objects = self.objects();
        let attempt = objects.entry(target.to_string()).or_insert(Attempt {
            desired,
            last: None,
            wrote: false,
            stalled: false,
        });
        if attempt.desired != desired {
            attempt.desired = desired;
            attempt.last = None;
            attempt.stalled = false;
        }
        attempt.wrote = true;
    }

    /// Consul holds what is wanted, or the object is gone or no longer ours: forget it.
    pub(crate) fn settled(&self, target: &str) {
        self.objects().remove(target);
    }

    /// How many objects are stalled right now.
    pub(crate) fn stalled(&self) -> usize {
        self.objects().values().filter(|a| a.stalled).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normalised_write_is_rewritten_once_then_stalls_until_something_changes() {
        let p = Progress::default();
        p.written("x", 1);
        // Consul stored 2 instead of 1.
        assert_eq!(p.before_rewrite("x", 1, 2, 10), Verdict::Write);
        p.written("x", 1);
        assert_eq!(p.before_rewrite("x", 1, 2, 11), Verdict::Stalled);
        assert_eq!(p.before_rewrite("x", 1, 2, 11), Verdict::Stalled);
        assert_eq!(p.stalled(), 1);
        // Someone changed it: that is drift again.
        assert_eq!(p.before_rewrite("x", 1, 3, 12), Verdict::Write);
        // A new desired value is written.
        assert_eq!(p.before_rewrite("x", 4, 2, 11), Verdict::Write);
    }

    #[test]
    fn repeated_drift_to_the_same_value_is_repaired_every_time() {
        let p = Progress::default();
        for index in [10, 20, 30] {
            assert_eq!(p.before_rewrite("x", 1, 2, index), Verdict::Write);
            p.written("x", 1);
            // The next pass finds the repair in place.
            p.settled("x");
        }
    }

    #[test]
    fn a_lost_check_and_set_is_not_a_stall() {
        let p = Progress::default();
        assert_eq!(p.before_rewrite("x", 1, 2, 10), Verdict::Write);
        // The write lost its CAS; the re-read shows someone else's touch, same content.
        assert_eq!(p.before_rewrite("x", 1, 2, 11), Verdict::Write);
    }
}
