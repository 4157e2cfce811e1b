//! The cursor blob: where a run is, in a few hundred bytes, for the trainer's checkpoint.
//!
//! Little-endian, versioned, length-prefixed and checksummed (xxh3-64 over everything
//! before the checksum). It names the static plan it belongs to by a 128-bit fingerprint
//! (since layout 7 of the plan-wide settings, with each domain's name and shard identity
//! beside its state; before, of the whole corpus and config), and the history it was
//! made under (schedule, stages, skips, reseeds before its step) by a 64-bit digest, so
//! a blob from another corpus, another config or a rewritten history is refused instead
//! of silently serving different data. Since layout 2 it also carries the journal of live
//! changes (see [`super::journal`]), so a resume after a reload reproduces the stream
//! even on a daemon that never saw the reload. Its size depends on the domains (their
//! names, and a tag per shard for those of at most 16 shards), reseeds, batch grouping's
//! spanning groups, stage switches and changes, never on the corpus's documents.

use super::journal::{Change, StageChange, MAX_CHANGES, MAX_POINTS};
use super::mix::MixState;
use super::permute::Reshuffle;
use super::stage::{CarryLevel, Upsampling};
use super::stream::{StreamState, Tail};
use crate::config::plan::Upsample;

/// First bytes of every blob.
pub const MAGIC: &[u8; 8] = b"MRCURSOR";
/// The newest layout version this build reads and writes. 2 added the journal, 3 batch
/// grouping's tails to each stream, 4 the count of superseded live changes after the
/// journal (written only when nonzero, else 3), 5 the binary fingerprint (the count is
/// always written), 6 a history digest that reaches the bursty lookahead past the
/// blob's step ([`CursorData::lookahead`]) and each stream's stage, dropped tokens and
/// carry levels (stage switches, `plan/stage.rs`), for its tails too, 7 a plan-wide
/// settings fingerprint ([`Fingerprint::Settings`]) and each domain's name and shard
/// identity ([`DomainRecord`]), so a resume maps domains by name and a config may add
/// domains (docs/DESIGN.md, "Corpus evolution"), 8 a stage record after each journal
/// change (stages added live, [`super::journal::StageChange`]; written only when the
/// journal holds one, else 7), 9 each stream's and tail's epoch upsampling
/// ([`super::stage::Upsampling`], a stage's `upsample_long`; written only when an epoch
/// uses a stage's override, else 7 or 8; a 9 writes the journal's stage records as 8
/// does), 10 the planner version after the plan step (written only by a build whose
/// [`super::PLAN_VERSION`] is not 1, with every field of 9; blobs before it are of
/// version 1). This build writes 7 to 9 (10 once its planner version is raised), reads
/// 5 and 6 as before and 1-4 with their JSON-text fingerprint
/// ([`Fingerprint::LegacyJson`]) so old checkpoints resume.
pub const VERSION: u16 = 10;
/// Most entries any list in a blob may hold, so a forged length cannot allocate much.
const MAX_LIST: usize = 4096;
// A blob lists every domain of its plan: every config must fit.
const _: () = assert!(crate::config::MAX_DOMAINS <= MAX_LIST);

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CursorError {
    /// Not a millrace cursor at all.
    #[error("not a millrace cursor (bad magic bytes)")]
    Magic,
    /// Written by a different layout version.
    #[error("cursor layout version {0} is not supported (this build reads 1..={VERSION})")]
    Version(u16),
    /// Cut short or padded.
    #[error("cursor is {got} bytes but says {want}")]
    Length {
        /// Bytes given.
        got: usize,
        /// Bytes the header claims.
        want: usize,
    },
    /// Damaged in storage or transit.
    #[error("cursor checksum mismatch (stored {stored:016x}, computed {computed:016x})")]
    Checksum {
        /// From the blob.
        stored: u64,
        /// Over the bytes.
        computed: u64,
    },
    /// Made by a build whose planner puts other rows in the same steps.
    #[error("cursor was made by a millrace build of planner version {blob}; this daemon's planner is version {ours}, which would fill the same steps with other data: resume this run with a build of planner version {blob} (`millrace --version` names it), or start its data stream anew")]
    PlanVersion {
        /// The blob's.
        blob: u32,
        /// This build's ([`super::PLAN_VERSION`]).
        ours: u32,
    },
    /// Made for another corpus or static plan config.
    #[error("cursor belongs to another corpus or plan config (fingerprint {blob:032x}, this plan {ours:032x}): the seq_len, batch size, seed or packing differ (or, for blobs before layout 7, the shards or domain settings)")]
    Fingerprint {
        /// From the blob.
        blob: u128,
        /// This plan's.
        ours: u128,
    },
    /// The schedule, stages, skips or reseeds before the blob's step differ from the config's.
    #[error("cursor resuming at step {step} (saved at the end of the step before) was made under a different history: the schedule, stages, skips or reseeds before step {step} (or inside a bursty cycle begun before it) changed (blob {blob:016x}, config {ours:016x}); only entries at or after step {step} (past that cycle) may be edited")]
    History {
        /// The step the blob resumes at (its step, one past the last step it saw).
        step: u64,
        /// From the blob.
        blob: u64,
        /// From the config.
        ours: u64,
    },
    /// The blob carries live changes this plan lacks ([`super::Plan::restore`] does not
    /// adopt them; [`super::Plan::resume`] does).
    #[error("cursor was made under a different journal of live mixture changes: the blob carries {blob} live changes, this plan only {ours}: load the blob's journal first")]
    JournalBehind {
        /// Changes the blob's journal holds.
        blob: usize,
        /// Changes this plan's journal holds.
        ours: usize,
    },
    /// This plan carries a change the blob lacks that starts before the blob's step, so
    /// it would rewrite batches the blob's run already received.
    #[error("cursor was made under a different journal of live mixture changes: this plan carries a change from plan step {at} that the blob (at plan step {plan_step}) does not: it would rewrite batches the blob's run already received")]
    JournalRewrites {
        /// First plan step of the offending change.
        at: u64,
        /// The blob's plan step.
        plan_step: u64,
    },
    /// The journals disagree: neither extends the other, so the runs received different
    /// changes.
    #[error("its journal of live mixture changes disagrees with this daemon's at change #{change} (blob: {}, daemon: {}); the blob's run received different changes, and serving it would change its data", from_step(*.blob_at), from_step(*.ours_at))]
    JournalDiverged {
        /// The first change that differs, counted from 1.
        change: usize,
        /// Where the blob's change #`change` starts (`None`: the blob has none).
        blob_at: Option<u64>,
        /// Where this plan's change #`change` starts (`None`: the plan has none).
        ours_at: Option<u64>,
    },
    /// Adopting the blob's journal would outgrow the daemon's cursor field.
    #[error("its journal of {changes} live changes is larger than this daemon's cursor field allows ({cap} bytes); give the daemon the [serve] live_changes of the run that wrote it")]
    JournalTooLarge {
        /// Changes the blob's journal holds.
        changes: usize,
        /// The journal bytes the caller allows.
        cap: usize,
    },
    /// The blob's journal brings changes the caller cannot serve (stages its rings or
    /// cursor field cannot hold).
    #[error("its live changes cannot be served here: {0}")]
    Unservable(String),
    /// The blob's journal does not apply to this plan.
    #[error(transparent)]
    JournalInvalid(super::PlanError),
    /// The blob carries a change this daemon lacks that starts before a step the daemon
    /// has already served to other clients without it.
    #[error("it carries a live change from plan step {at} that this daemon does not have, but step {step} (plan step {plan_step}) has already been served to other clients without it (a rank resumed from a blob saved before the change). Resume every rank from the blob that carries the change (the blobs of one step serve any rank), or write the change into the config file and restart the daemon")]
    Served {
        /// First plan step of the blob's change.
        at: u64,
        /// The first trainer step the daemon may still change.
        step: u64,
        /// Its plan step.
        plan_step: u64,
    },
    /// Ends before a field it needs.
    #[error("cursor is malformed: truncated at byte {at}")]
    Truncated {
        /// Offset of the field that does not fit.
        at: usize,
    },
    /// A list longer than any this build writes (a forged length).
    #[error("cursor is malformed: {what}: {n} {unit}")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        n: usize,
        /// What it counts.
        unit: &'static str,
    },
    /// A domain name that is not UTF-8.
    #[error("cursor is malformed: the domain name at byte {at} is not UTF-8")]
    Name {
        /// Offset of the name.
        at: usize,
    },
    /// A journal change's stage record of an unknown kind (layout 8).
    #[error("cursor is malformed: the journal's stage record at byte {at} has kind {kind} (0 or 1 expected)")]
    StageKind {
        /// Offset of the kind byte.
        at: usize,
        /// The kind found.
        kind: u8,
    },
    /// An epoch upsampling record of an unknown kind (layout 9).
    #[error("cursor is malformed: the upsampling record at byte {at} has kind {kind} (0, 1 or 2 expected)")]
    UpsampleKind {
        /// Offset of the kind byte.
        at: usize,
        /// The kind found.
        kind: u8,
    },
    /// Names a domain twice (layout 7).
    #[error("cursor is malformed: it names domain {domain} twice")]
    DuplicateDomain {
        /// The name.
        domain: String,
    },
    /// Carries a domain this config does not have (layout 7).
    #[error("it carries domain {domain}, which this config does not have: a domain of a run may be weighted 0 (it keeps its position) but not removed")]
    DomainGone {
        /// The blob's domain.
        domain: String,
    },
    /// A domain whose shards changed content since the blob was written, without being
    /// declared as an increment (layout 7).
    #[error("domain {domain}: {what}; the blob's position in it would name other documents (a changed shard needs a new domain name or a fresh run)")]
    DomainChanged {
        /// The domain's name.
        domain: String,
        /// Which shard, and how.
        what: String,
    },
    /// A domain new to the blob that the config weights before the blob's step.
    #[error("domain {domain} is new to this blob, whose run planned the steps before plan step {plan_step}, but the config gives it weight at plan step {step}: that would rewrite steps already served; weight it 0 before plan step {plan_step} (a schedule point with ramp = false adds it from a step)")]
    DomainEarly {
        /// The new domain.
        domain: String,
        /// A plan step before the blob's where it has weight.
        step: u64,
        /// The blob's plan step (or the end of a bursty cycle it had begun).
        plan_step: u64,
    },
    /// Bytes left over after the last field.
    #[error("cursor is malformed: {bytes} unexpected bytes after the last domain")]
    Trailing {
        /// How many.
        bytes: usize,
    },
    /// Its domain count or steps do not fit this plan.
    #[error("cursor is malformed: {domains} domains at step {step} (plan step {plan_step}) do not fit this plan ({ours} domains, plan step {expected})")]
    Shape {
        /// Domains in the blob.
        domains: usize,
        /// The blob's trainer step.
        step: u64,
        /// The blob's plan step.
        plan_step: u64,
        /// Domains in this plan.
        ours: usize,
        /// The plan step this plan maps the blob's step to.
        expected: u64,
    },
    /// A step beyond any a run reaches ([`crate::config::plan::MAX_STEP`]): only a forged
    /// blob has one, and step arithmetic near `u64::MAX` would overflow.
    #[error("cursor is malformed: step {step} (plan step {plan_step}) is beyond {max}")]
    Step {
        /// The blob's trainer step.
        step: u64,
        /// The blob's plan step.
        plan_step: u64,
        /// The most a run may reach.
        max: u64,
    },
    /// A mixer's carried error larger than any real run makes (it would make the mixer
    /// spin): a forged blob, or one of a build before the error saturated
    /// ([`super::mix::Mixer::deficit_cap`]), taken past where that build refused it.
    #[error(
        "cursor is malformed: domain {domain}'s mixer carried error is {rows} rows, beyond \
         the {most} rows a run of this plan reaches"
    )]
    Deficit {
        /// The first domain out of range, by name.
        domain: String,
        /// Its carried error, in whole rows (rounded toward zero).
        rows: i64,
        /// The most a run of this plan carries for it, in rows.
        most: u64,
    },
    /// A reshuffle chain longer than the plan's reseeds (each adds at most one entry):
    /// only a forged blob has one, and every unit of a window walks the chain.
    #[error("cursor is malformed: domain {domain}: {n} reshuffles in a chain, but this plan has {most} reseed(s)")]
    Reshuffles {
        /// The domain's name.
        domain: String,
        /// The longest chain's length.
        n: usize,
        /// The plan's reseeds.
        most: usize,
    },
    /// A domain's stream state does not fit the window it points at.
    #[error("cursor is malformed: domain {domain}: {source}")]
    Stream {
        /// The domain's name.
        domain: String,
        /// What is wrong with it.
        source: super::stream::StreamError,
    },
}

/// One domain as a layout 7 blob records it: resumes find it by name and check the
/// shards it knew.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainRecord {
    /// The domain's name.
    pub name: String,
    /// Shards the domain had when the blob was written.
    pub shards: u32,
    /// Identity of those shards and the domain's settings (`plan/fingerprint.rs`).
    pub identity: u128,
    /// A 32-bit tag per shard, for domains of at most 16 shards (else empty): names the
    /// shard that changed.
    pub tags: Vec<u32>,
}

/// "from plan step N", or "none" for a change one journal does not have.
fn from_step(at: Option<u64>) -> String {
    at.map_or("none".to_string(), |at| format!("from plan step {at}"))
}

/// A blob's fingerprint, with the scheme its layout says it was computed by: the plan
/// compares it with its own fingerprint of the same scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fingerprint {
    /// Layout 5 on: the hash of the canonical binary encoding (`plan/fingerprint.rs`).
    Binary(u128),
    /// Layout 7 on: the plan-wide settings only; domains are identified one by one
    /// ([`CursorData::domains`]).
    Settings(u128),
    /// Layouts 1-4: the hash of JSON text; encoding one writes layout 3 or 4, as the
    /// builds that wrote them did.
    LegacyJson(u128),
}

impl Fingerprint {
    /// The 128-bit value, whatever its scheme.
    pub fn value(self) -> u128 {
        match self {
            Fingerprint::Binary(v) | Fingerprint::Settings(v) | Fingerprint::LegacyJson(v) => v,
        }
    }
}

/// Everything a blob holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CursorData {
    /// Corpus + static config.
    pub fingerprint: Fingerprint,
    /// Past schedule/skips/reseeds: [`super::Plan::history`] at `plan_step`, or (when
    /// `lookahead`) at `plan_step` plus the bursty lookahead.
    pub history: u64,
    /// Whether `history` reaches past `plan_step` by the plan's bursty lookahead (layout
    /// 6 on): a bursty domain's cycle begun before the blob took its rows from weights of
    /// steps after it, so an edit there rewrites the blob's past too.
    pub lookahead: bool,
    /// Next trainer step.
    pub step: u64,
    /// Next plan step (differs from `step` after skips).
    pub plan_step: u64,
    /// Mixer state.
    pub mix: MixState,
    /// Per-domain stream states, in domain order.
    pub streams: Vec<StreamState>,
    /// Per-domain names and identities, in the same order (layout 7 on; empty before).
    pub domains: Vec<DomainRecord>,
    /// Live mixture changes in force, in the order they were accepted.
    pub journal: Vec<Change>,
    /// Changes accepted and then dropped from `journal` as superseded (layouts 4 and
    /// 5; 0 in older layouts, which never dropped one).
    pub superseded: u64,
    /// The [`super::PLAN_VERSION`] of the build that made it (layout 10; 1 before,
    /// which every build before planner versions had).
    pub plan_version: u32,
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn chain(&mut self, chain: &[Reshuffle]) {
        self.u16(chain.len() as u16);
        for r in chain {
            self.u64(r.start);
            self.u64(r.key);
        }
    }
    fn pending(&mut self, pending: &[(u32, u32)]) {
        self.u16(pending.len() as u16);
        for &(b, done) in pending {
            self.u32(b);
            self.u32(done);
        }
    }
    fn carry(&mut self, carry: &[CarryLevel]) {
        self.u16(carry.len() as u16);
        for c in carry {
            self.u32(c.stage);
            self.u32(c.next_block);
            self.chain(&c.block_chain);
            self.pending(&c.pending);
        }
    }
    /// An epoch's upsampling (layout 9): kind 0 the domain's own, 1 off, 2 a setting.
    fn upsample(&mut self, u: Upsampling) {
        match u {
            Upsampling::Domain => self.u8(0),
            Upsampling::Off => self.u8(1),
            Upsampling::Long(u) => {
                self.u8(2);
                self.u64(u.min_tokens);
                self.u32(u.factor);
            }
        }
    }
}

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CursorError> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or(CursorError::Truncated { at: self.at })?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CursorError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CursorError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, CursorError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, CursorError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn chain(&mut self) -> Result<Vec<Reshuffle>, CursorError> {
        let k = self.len("reshuffles")?;
        let mut chain = Vec::with_capacity(k);
        for _ in 0..k {
            chain.push(Reshuffle {
                start: self.u64()?,
                key: self.u64()?,
            });
        }
        Ok(chain)
    }
    fn pending(&mut self) -> Result<Vec<(u32, u32)>, CursorError> {
        let k = self.len("pending")?;
        let mut pending = Vec::with_capacity(k);
        for _ in 0..k {
            pending.push((self.u32()?, self.u32()?));
        }
        Ok(pending)
    }
    fn carry(&mut self) -> Result<Vec<CarryLevel>, CursorError> {
        let k = self.len("carry levels")?;
        let mut carry = Vec::with_capacity(k);
        for _ in 0..k {
            carry.push(CarryLevel {
                stage: self.u32()?,
                next_block: self.u32()?,
                block_chain: self.chain()?,
                pending: self.pending()?,
            });
        }
        Ok(carry)
    }
    fn upsample(&mut self) -> Result<Upsampling, CursorError> {
        match self.u8()? {
            0 => Ok(Upsampling::Domain),
            1 => Ok(Upsampling::Off),
            2 => Ok(Upsampling::Long(Upsample {
                min_tokens: self.u64()?,
                factor: self.u32()?,
            })),
            kind => Err(CursorError::UpsampleKind {
                at: self.at - 1,
                kind,
            }),
        }
    }
    fn len(&mut self, what: &'static str) -> Result<usize, CursorError> {
        let n = self.u16()? as usize;
        if n > MAX_LIST {
            return Err(CursorError::TooMany {
                what,
                n,
                unit: "entries",
            });
        }
        Ok(n)
    }
}

/// Serialises a cursor.
pub fn encode(c: &CursorData) -> Vec<u8> {
    encode_with_state(c).0
}

/// [`encode`], and the blob's plan state digest: the xxh3-64 of its fingerprint, steps
/// and per-domain state (shard identities, mixer, streams), leaving out its history
/// digest and journal. Two daemons that plan the same batches reach the same state
/// whatever journals of live changes they hold (one may have adopted from a blob a
/// change the other's config file makes), so this, not the blob's bytes, is what nodes
/// compare to find one that plans differently (slot header `plan_state`).
pub fn encode_with_state(c: &CursorData) -> (Vec<u8>, u64) {
    let mut w = W(Vec::with_capacity(64 + 128 * c.streams.len()));
    w.0.extend_from_slice(MAGIC);
    let staged = c.journal.iter().any(|ch| ch.stage.is_some());
    let upsampled = c.streams.iter().any(|s| {
        s.upsample != Upsampling::Domain || s.tails.iter().any(|t| t.upsample != Upsampling::Domain)
    });
    let version: u16 = match c.fingerprint {
        Fingerprint::Settings(_) if c.plan_version != 1 => 10,
        Fingerprint::Settings(_) if upsampled => 9,
        Fingerprint::Settings(_) if staged => 8,
        Fingerprint::Settings(_) => 7,
        Fingerprint::Binary(_) if c.lookahead => 6,
        Fingerprint::Binary(_) => 5,
        Fingerprint::LegacyJson(_) if c.superseded > 0 => 4,
        Fingerprint::LegacyJson(_) => 3,
    };
    w.u16(version);
    w.u16(0); // flags, reserved
    w.u32(0); // total length, patched below
    let fingerprint = c.fingerprint.value();
    w.u64(fingerprint as u64);
    w.u64((fingerprint >> 64) as u64);
    w.u64(c.history);
    w.u64(c.step);
    w.u64(c.plan_step);
    if version >= 10 {
        w.u32(c.plan_version);
    }
    w.u16(c.streams.len() as u16);
    for (d, s) in c.streams.iter().enumerate() {
        if version >= 7 {
            let r = c.domains.get(d).cloned().unwrap_or_default();
            w.u16(r.name.len() as u16);
            w.0.extend_from_slice(r.name.as_bytes());
            w.u32(r.shards);
            w.u64(r.identity as u64);
            w.u64((r.identity >> 64) as u64);
            w.u16(r.tags.len() as u16);
            for t in &r.tags {
                w.u32(*t);
            }
        }
        w.u64(c.mix.rows.get(d).copied().unwrap_or(0));
        w.u64(c.mix.deficit.get(d).copied().unwrap_or(0) as u64);
        w.u32(s.epoch);
        w.u8(s.grouped as u8);
        w.u8(s.started as u8);
        w.u64(s.epoch_seed);
        w.u64(s.window_start);
        w.u32(s.next_block);
        w.u32(s.reseeds);
        w.u64(s.rows);
        w.u64(s.tokens);
        w.u64(s.split_groups);
        w.chain(&s.pos_chain);
        w.chain(&s.block_chain);
        w.pending(&s.pending);
        w.u16(s.tails.len() as u16);
        for t in &s.tails {
            w.u32(t.epoch);
            w.u8(t.grouped as u8);
            w.u64(t.epoch_seed);
            w.u64(t.window_start);
            w.chain(&t.pos_chain);
            w.pending(&t.pending);
            if version >= 6 {
                w.carry(&t.carry);
            }
            if version >= 9 {
                w.upsample(t.upsample);
            }
        }
        if version >= 6 {
            w.u32(s.stage);
            w.u64(s.dropped);
            w.carry(&s.carry);
        }
        if version >= 9 {
            w.upsample(s.upsample);
        }
    }
    let journal_at = w.0.len();
    w.u16(c.journal.len() as u16);
    for change in &c.journal {
        w.u64(change.at);
        w.u16(change.points.len() as u16);
        for (step, weights) in &change.points {
            w.u64(*step);
            for d in 0..c.streams.len() {
                w.u64(weights.get(d).copied().unwrap_or(0.0).to_bits());
            }
        }
        if version >= 8 {
            match change.stage {
                None => w.u8(0),
                Some(st) => {
                    w.u8(1);
                    w.u32(st.seq_len);
                    w.u32(st.rows);
                    w.u64(st.window);
                    w.u8(st.chain_groups as u8);
                }
            }
        }
    }
    if version >= 4 {
        w.u64(c.superseded);
    }
    let total = (w.0.len() + 8) as u32;
    w.0[12..16].copy_from_slice(&total.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&w.0);
    w.u64(sum);
    // Fingerprint (16..32), then steps and domains (40..journal_at): not the magic,
    // layout (8 when the journal holds a stage), length or history digest.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&w.0[16..32]);
    h.update(&w.0[40..journal_at]);
    (w.0, h.digest())
}

/// Parses and checks a blob's framing (magic, version, length, checksum). Fingerprint and
/// history are checked by the plan, which knows its own.
pub fn decode(b: &[u8]) -> Result<CursorData, CursorError> {
    if b.get(..8) != Some(&MAGIC[..]) {
        return Err(CursorError::Magic);
    }
    if b.len() < 16 {
        // A cursor cut inside its header (a checkpoint written by a full disk).
        return Err(CursorError::Truncated { at: b.len() });
    }
    let mut r = R { b, at: 8 };
    let version = r.u16()?;
    if version == 0 || version > VERSION {
        return Err(CursorError::Version(version));
    }
    let _flags = r.u16()?;
    let want = r.u32()? as usize;
    if want != b.len() || want < 24 {
        return Err(CursorError::Length { got: b.len(), want });
    }
    let body = &b[..want - 8];
    let mut sb = [0u8; 8];
    sb.copy_from_slice(&b[want - 8..]);
    let stored = u64::from_le_bytes(sb);
    let computed = xxhash_rust::xxh3::xxh3_64(body);
    if stored != computed {
        return Err(CursorError::Checksum { stored, computed });
    }
    let mut r = R { b: body, at: 16 };
    let lo = r.u64()? as u128;
    let hi = r.u64()? as u128;
    let fingerprint = match lo | (hi << 64) {
        v if version >= 7 => Fingerprint::Settings(v),
        v if version >= 5 => Fingerprint::Binary(v),
        v => Fingerprint::LegacyJson(v),
    };
    let history = r.u64()?;
    let step = r.u64()?;
    let plan_step = r.u64()?;
    let plan_version = if version >= 10 { r.u32()? } else { 1 };
    let n = r.len("domains")?;
    let mut mix = MixState::new(n);
    let mut streams = Vec::with_capacity(n);
    let mut domains = Vec::new();
    for d in 0..n {
        if version >= 7 {
            let len = r.len("name bytes")?;
            let name = String::from_utf8(r.take(len)?.to_vec())
                .map_err(|_| CursorError::Name { at: r.at - len })?;
            let shards = r.u32()?;
            let identity = r.u64()? as u128 | (r.u64()? as u128) << 64;
            let k = r.len("tags")?;
            let mut tags = Vec::with_capacity(k);
            for _ in 0..k {
                tags.push(r.u32()?);
            }
            domains.push(DomainRecord {
                name,
                shards,
                identity,
                tags,
            });
        }
        mix.rows[d] = r.u64()?;
        mix.deficit[d] = r.u64()? as i64;
        let mut s = StreamState {
            epoch: r.u32()?,
            grouped: r.u8()? != 0,
            started: r.u8()? != 0,
            epoch_seed: r.u64()?,
            window_start: r.u64()?,
            next_block: r.u32()?,
            reseeds: r.u32()?,
            rows: r.u64()?,
            tokens: r.u64()?,
            split_groups: r.u64()?,
            ..StreamState::default()
        };
        s.pos_chain = r.chain()?;
        s.block_chain = r.chain()?;
        s.pending = r.pending()?;
        if version >= 3 {
            let k = r.len("tails")?;
            for _ in 0..k {
                s.tails.push(Tail {
                    epoch: r.u32()?,
                    grouped: r.u8()? != 0,
                    epoch_seed: r.u64()?,
                    window_start: r.u64()?,
                    pos_chain: r.chain()?,
                    pending: r.pending()?,
                    carry: if version >= 6 { r.carry()? } else { Vec::new() },
                    upsample: if version >= 9 {
                        r.upsample()?
                    } else {
                        Upsampling::Domain
                    },
                });
            }
        }
        if version >= 6 {
            s.stage = r.u32()?;
            s.dropped = r.u64()?;
            s.carry = r.carry()?;
        }
        if version >= 9 {
            s.upsample = r.upsample()?;
        }
        streams.push(s);
    }
    let mut journal = Vec::new();
    if version >= 2 {
        let k = r.len("journal")?;
        if k > MAX_CHANGES {
            return Err(CursorError::TooMany {
                what: "journal",
                n: k,
                unit: "changes",
            });
        }
        for _ in 0..k {
            let at = r.u64()?;
            let m = r.len("journal points")?;
            if m > MAX_POINTS {
                return Err(CursorError::TooMany {
                    what: "journal",
                    n: m,
                    unit: "points",
                });
            }
            let mut points = Vec::with_capacity(m);
            for _ in 0..m {
                let step = r.u64()?;
                let mut weights = Vec::with_capacity(n);
                for _ in 0..n {
                    weights.push(f64::from_bits(r.u64()?));
                }
                points.push((step, weights));
            }
            let stage = match if version >= 8 { r.u8()? } else { 0 } {
                0 => None,
                1 => Some(StageChange {
                    seq_len: r.u32()?,
                    rows: r.u32()?,
                    window: r.u64()?,
                    chain_groups: r.u8()? != 0,
                }),
                kind => return Err(CursorError::StageKind { at: r.at - 1, kind }),
            };
            journal.push(Change { at, points, stage });
        }
    }
    let superseded = if version >= 4 { r.u64()? } else { 0 };
    if r.at != body.len() {
        return Err(CursorError::Trailing {
            bytes: body.len() - r.at,
        });
    }
    Ok(CursorData {
        fingerprint,
        history,
        lookahead: version >= 6,
        step,
        plan_step,
        mix,
        streams,
        domains,
        journal,
        superseded,
        plan_version,
    })
}

/// Bytes a journal (and its superseded count) adds to a blob of `domains` domains, so
/// the daemon can refuse a change that would outgrow the slot's cursor field before
/// accepting it. An upper bound: it counts each change's stage kind byte whenever a blob
/// may write it (layout 8 for a journal with a stage, 9 for an epoch a stage upsamples).
pub fn journal_bytes(journal: &[Change], domains: usize) -> usize {
    2 + 8
        + journal
            .iter()
            .map(|c| 10 + c.points.len() * (8 + 8 * domains) + stage_bytes(c))
            .sum::<usize>()
}

/// Bytes [`journal_bytes`] counts for a weights change of one point over `domains`
/// domains (what `set-weights` adds): the room a daemon reserves per live change.
pub fn one_point_change_bytes(domains: usize) -> usize {
    10 + 8 + 8 * domains + 1
}

/// Bytes a change's stage record takes (layout 8 and later): a kind byte, and the shape
/// for a stage change.
fn stage_bytes(c: &Change) -> usize {
    match c.stage {
        None => 1,
        Some(_) => 18,
    }
}
