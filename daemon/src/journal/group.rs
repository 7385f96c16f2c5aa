//! One group commit as the writer seals it: every record numbered, chained and laid out for the log and for the
//! spool, and the spool's part measured, so that a submission goes into a group whole or not at all.

use crate::log::{chain, tree};
use crate::record::line::SEQ_PREFIX;
use crate::spool;

use super::submit::Batch;

/// Where numbering and chain stand: after the log's last record, or after a group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// The `seq` the next record gets.
    pub(super) next_seq: u64,
    /// The hash of the last persisted record (or the genesis value).
    pub(super) chain: chain::Hash,
    /// The `seq` of the group's last persisted record, if it has one.
    pub(super) last_persisted: Option<u64>,
}

/// The bytes of one group commit: log lines (sealed into the chain) and the spool's part, built submission by
/// submission. Reused from group to group, so its buffers are allocated once.
pub(super) struct Group {
    log: Vec<u8>,
    spool: spool::Group,
    first_seq: u64,
    head: Head,
    /// The group's log records as the Merkle tree takes them.
    leaves: Vec<tree::Entry>,
    /// Submissions taken.
    taken: usize,
    seq_text: itoa::Buffer,
}

impl Group {
    /// An empty group with room for `bytes` of log lines.
    pub(super) fn with_capacity(bytes: usize) -> Group {
        Group {
            log: Vec::with_capacity(bytes),
            spool: spool::Group::default(),
            first_seq: 0,
            head: Head {
                next_seq: 0,
                chain: chain::GENESIS,
                last_persisted: None,
            },
            leaves: Vec::new(),
            taken: 0,
            seq_text: itoa::Buffer::new(),
        }
    }

    /// Empties the group; its records will be numbered from `next_seq` and chained after `chain`.
    pub(super) fn begin(&mut self, next_seq: u64, chain: chain::Hash) {
        self.log.clear();
        self.spool.clear();
        self.leaves.clear();
        self.first_seq = next_seq;
        self.head = Head {
            next_seq,
            chain,
            last_persisted: None,
        };
        self.taken = 0;
    }

    /// Seals every record of `batch` after the group's. The first batch is always taken; a later one only when
    /// the group's spool part (its bytes for the segment file) then still `fits`; otherwise the group is left
    /// exactly as it was and the result is false.
    pub(super) fn add(&mut self, batch: &Batch, fits: impl FnOnce(u64) -> bool) -> bool {
        let before = (
            self.log.len(),
            self.spool.mark(),
            self.head,
            self.leaves.len(),
        );
        let head = &mut self.head;
        for (tail, route, digest) in batch.tails() {
            let start = self.log.len();
            self.log.extend_from_slice(SEQ_PREFIX);
            self.log
                .extend_from_slice(self.seq_text.format(head.next_seq).as_bytes());
            self.log.extend_from_slice(tail);
            if route.persist {
                head.chain = chain::seal_digest(&head.chain, head.next_seq, digest, &mut self.log);
                head.last_persisted = Some(head.next_seq);
                self.leaves.push(tree::Entry {
                    seq: head.next_seq,
                    digest: *digest,
                });
            } else {
                self.log.push(b'}');
            }
            self.log.push(b'\n');
            if route.stream {
                self.spool.push(&self.log[start..], route.persist);
            }
            if !route.persist {
                self.log.truncate(start);
            }
            head.next_seq += 1;
        }
        if self.taken > 0 && !fits(self.spool.file_len()) {
            let (log_len, spool_mark, head, leaves) = before;
            self.log.truncate(log_len);
            self.spool.truncate(spool_mark);
            self.head = head;
            self.leaves.truncate(leaves);
            return false;
        }
        self.taken += 1;
        true
    }

    /// The log's lines, and the spool's part (which publishing empties).
    pub(super) fn parts(&mut self) -> (&[u8], &mut spool::Group) {
        (&self.log, &mut self.spool)
    }

    /// The group's log records, for the Merkle tree.
    pub(super) fn leaves(&self) -> &[tree::Entry] {
        &self.leaves
    }

    /// Bytes of log lines.
    pub(super) fn log_bytes(&self) -> u64 {
        self.log.len() as u64
    }

    /// Bytes for the spool's segment file.
    pub(super) fn spool_bytes(&self) -> u64 {
        self.spool.file_len()
    }

    /// The `seq` of the group's first record.
    pub(super) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Records in the group.
    pub(super) fn records(&self) -> u64 {
        self.head.next_seq - self.first_seq
    }

    /// Where numbering and chain stand after the group.
    pub(super) fn head(&self) -> Head {
        self.head
    }
}
