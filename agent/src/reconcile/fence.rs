//! The agent's own check of the schedulers' fencing tokens.
//!
//! Every scheduling write is already a Txn that compares the writer's
//! election key, so a deposed scheduler cannot commit. The agent checks
//! again, from what its watch shows, so a record that got past that (a
//! hand-written one, a writer with a bug) is not started.
//!
//! A token is the create revision of its scheduler's election key, and
//! that key is made when the candidate starts campaigning, not when it
//! wins: the old leader keeps writing, legitimately, at revisions past
//! the next leader's token while the next one waits. So "created after a
//! newer token" is no proof of anything. What is proof: a record carrying
//! the newer token was written at revision W, so that scheduler led at W
//! and every older one had lost by then; a record with an older token
//! created after W was written by a deposed scheduler.
//!
//! A token is always below the revision of any record carrying it (the
//! election key was made before): a record claiming otherwise is refused
//! and teaches nothing, so one hand-written record with a huge token cannot
//! make every later one look fenced.
//!
//! One fence per challenge: a challenge's records are written only by the
//! leader of its shard, and the leaders of different shards hold tokens
//! side by side, so a token is compared only with its own shard's.

/// What the agent has learned about the newest scheduler.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fence {
    /// The highest token seen in a record.
    newest: i64,
    /// The earliest revision at which a record carrying `newest` was
    /// written: its scheduler led then.
    led_at: i64,
}

/// Why the fence refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Created after a scheduler with a newer token (`newest`) was seen
    /// writing at `led_at`.
    Deposed { newest: i64, led_at: i64 },
    /// Its token is not below its own revision: no election made it.
    Impossible,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Deposed { newest, led_at } => write!(
                f,
                "a scheduler with the newer token {newest} was already writing at revision {led_at}"
            ),
            Refused::Impossible => {
                f.write_str("no election made that token: it is not below the record's revision")
            }
        }
    }
}

impl Fence {
    /// Checks a record carrying `token`, created at `create_revision` and
    /// last written at `mod_revision`; learns from it when it passes.
    ///
    /// Records are checked in watch order and, after a relist, in key
    /// order: the rule only ever refuses on proof, so an order that hides
    /// the proof lets a bad record through rather than refusing a good one.
    pub(super) fn check(
        &mut self,
        token: i64,
        create_revision: i64,
        mod_revision: i64,
    ) -> Result<(), Refused> {
        if token >= mod_revision {
            return Err(Refused::Impossible);
        }
        if token < self.newest {
            if create_revision > self.led_at {
                return Err(Refused::Deposed {
                    newest: self.newest,
                    led_at: self.led_at,
                });
            }
            return Ok(());
        }
        if token > self.newest {
            self.newest = token;
            self.led_at = mod_revision;
        } else {
            self.led_at = self.led_at.min(mod_revision);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_leader_writes_past_a_waiting_candidates_token() {
        // A leads with token 10. B starts campaigning at revision 20 (its
        // token), A creates a record at 25, A dies, B renews that record
        // at 40 (the token stays A's) and spawns at 41.
        let mut f = Fence::default();
        assert_eq!(f.check(10, 25, 25), Ok(()));
        assert_eq!(f.check(20, 41, 41), Ok(()));
        assert_eq!(f.check(10, 25, 40), Ok(()), "B's renewal of A's record");
        // The same after a relist, in key order: B's record first.
        let mut relisted = Fence::default();
        assert_eq!(relisted.check(20, 41, 41), Ok(()));
        assert_eq!(relisted.check(10, 25, 40), Ok(()));
    }

    #[test]
    fn a_record_created_after_a_newer_scheduler_wrote_is_refused() {
        let mut f = Fence::default();
        assert_eq!(f.check(20, 41, 41), Ok(()));
        let refused = Refused::Deposed {
            newest: 20,
            led_at: 41,
        };
        assert_eq!(f.check(10, 42, 42), Err(refused));
        // Refusals teach nothing: the newest stays as it was.
        assert_eq!(
            f,
            Fence {
                newest: 20,
                led_at: 41
            }
        );
        // An earlier write of the newest token moves the proof back.
        assert_eq!(f.check(20, 30, 35), Ok(()));
        assert_eq!(
            f.check(10, 36, 36),
            Err(Refused::Deposed {
                newest: 20,
                led_at: 35
            })
        );
        assert_eq!(f.check(10, 34, 50), Ok(()), "created before B led");
    }

    #[test]
    fn a_pooled_record_claimed_by_the_next_leader_proves_it_led_at_the_claim() {
        // A (token 10) fills the pool at 15; B (token 20) claims it at 60:
        // the claim carries B's token, the create revision stays A's.
        let mut f = Fence::default();
        assert_eq!(f.check(20, 15, 60), Ok(()));
        // A's records created before the claim are not refused.
        assert_eq!(f.check(10, 50, 50), Ok(()));
        assert!(f.check(10, 61, 61).is_err());
    }

    #[test]
    fn newer_tokens_replace_the_proof() {
        let mut f = Fence::default();
        assert_eq!(f.check(20, 41, 41), Ok(()));
        assert_eq!(f.check(30, 90, 90), Ok(()));
        // B's record created between B's and C's first writes passes.
        assert_eq!(f.check(20, 60, 60), Ok(()));
        assert!(f.check(20, 91, 91).is_err());
    }

    #[test]
    fn a_token_from_no_election_is_refused_and_teaches_nothing() {
        let mut f = Fence::default();
        assert_eq!(f.check(20, 41, 41), Ok(()));
        // Hand-written: a token past its own revision.
        assert_eq!(f.check(1_000_000_000_000, 50, 50), Err(Refused::Impossible));
        assert_eq!(f.check(50, 50, 50), Err(Refused::Impossible));
        // Later legitimate records are not refused because of it.
        assert_eq!(f.check(20, 60, 60), Ok(()));
        assert_eq!(
            f,
            Fence {
                newest: 20,
                led_at: 41
            }
        );
    }
}
