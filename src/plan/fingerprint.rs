//! The plan fingerprint: a 128-bit identity of the corpus and the static plan config,
//! which every cursor blob carries so that a blob is never resumed on data it was not
//! made for.
//!
//! It covers only what shapes every step: the planner's version (from 2 on,
//! [`super::PLAN_VERSION`]), the manifest (the caller's hash of shard identities), seed,
//! `seq_len`, `global_batch_rows`, packing, the packing window, and per domain its name,
//! every planning setting and each shard's documents and tokens.
//! Not the schedule, stages (`[plan]`'s own shape is stage 0 and is covered), skips or
//! reseeds: the history digest covers those up to a cursor's step, so the future may be
//! edited.
//!
//! Since cursor layout 5 it is xxh3-128 of an explicit binary encoding
//! ([`fingerprint`]), so no serializer setting can change what a blob means. Blobs of
//! layouts 1-4 carry [`legacy_json_fingerprint`] and still resume. docs/FORMATS.md has
//! the encoding byte by byte.

use super::{DomainInput, PlanConfig};
use crate::config::plan::{Bursty, DomainSettings, GroupMode, Grouping, Packing, Upsample};

/// Version of the binary encoding, its first byte: a new way of encoding the same facts
/// gets a new number (and a new cursor layout).
const SCHEME: u8 = 1;

/// The fingerprint of cursor layouts 5 and on: xxh3-128 of [`encode`].
pub(super) fn fingerprint(cfg: &PlanConfig, inputs: &[DomainInput], manifest: u128) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&encode(cfg, inputs, manifest))
}

/// The canonical encoding: little-endian integers, floats as their IEEE-754 bits,
/// strings and lists prefixed by a u32 count, optional fields and enums as a tag byte.
/// Settings structs are destructured whole, so a field added to them fails to compile
/// here until it is encoded (with a new [`SCHEME`]).
fn encode(cfg: &PlanConfig, inputs: &[DomainInput], manifest: u128) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + inputs.len() * 64);
    b.push(SCHEME);
    // Version 1 encodes nothing, so the fingerprints of the builds before versions
    // existed (all of version 1) stay what they were.
    if super::PLAN_VERSION != 1 {
        b.extend_from_slice(&super::PLAN_VERSION.to_le_bytes());
    }
    b.extend_from_slice(&manifest.to_le_bytes());
    encode_plan(&mut b, cfg);
    b.extend_from_slice(&(inputs.len() as u32).to_le_bytes());
    for d in inputs {
        b.extend_from_slice(&(d.name.len() as u32).to_le_bytes());
        b.extend_from_slice(d.name.as_bytes());
        encode_settings(&mut b, d.settings);
        b.extend_from_slice(&(d.shards.len() as u32).to_le_bytes());
        for (_, s) in &d.shards {
            b.extend_from_slice(&s.documents().to_le_bytes());
            b.extend_from_slice(&s.tokens().to_le_bytes());
        }
    }
    b
}

/// The plan-wide settings in the canonical encoding: seed, `seq_len`,
/// `global_batch_rows`, packing and its window.
fn encode_plan(b: &mut Vec<u8>, cfg: &PlanConfig) {
    b.extend_from_slice(&cfg.seed.to_le_bytes());
    b.extend_from_slice(&cfg.seq_len.to_le_bytes());
    b.extend_from_slice(&cfg.global_batch_rows.to_le_bytes());
    b.push(match cfg.packing {
        Packing::Concat => 0,
        Packing::BestFit => 1,
    });
    b.extend_from_slice(&cfg.best_fit_window.to_le_bytes());
}

/// A domain's planning settings in the canonical encoding. Destructured whole, so a field
/// added to them fails to compile here until it is encoded.
fn encode_settings(b: &mut Vec<u8>, settings: DomainSettings) {
    let DomainSettings {
        grouping,
        upsample_long,
        bursty,
        window,
    } = settings;
    let Grouping {
        mode,
        max_share,
        from_step,
    } = grouping;
    b.push(match mode {
        GroupMode::Off => 0,
        GroupMode::Sequence => 1,
        GroupMode::Batch => 2,
    });
    b.extend_from_slice(&max_share.to_bits().to_le_bytes());
    b.extend_from_slice(&from_step.to_le_bytes());
    match upsample_long {
        None => b.push(0),
        Some(Upsample { min_tokens, factor }) => {
            b.push(1);
            b.extend_from_slice(&min_tokens.to_le_bytes());
            b.extend_from_slice(&factor.to_le_bytes());
        }
    }
    match bursty {
        None => b.push(0),
        Some(Bursty { period }) => {
            b.push(1);
            b.extend_from_slice(&period.to_le_bytes());
        }
    }
    match window {
        None => b.push(0),
        Some(w) => {
            b.push(1);
            b.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// Scheme byte of the plan-wide settings fingerprint that cursor layout 7 carries.
const SETTINGS_SCHEME: u8 = 2;

/// The plan-wide fingerprint of cursor layout 7: only what no corpus change may alter
/// (seed, `seq_len`, `global_batch_rows`, packing and its window). The domains are
/// identified one by one ([`DomainIdentity`]), so adding one keeps earlier blobs valid.
pub(super) fn settings_fingerprint(cfg: &PlanConfig) -> u128 {
    let mut b = vec![SETTINGS_SCHEME];
    encode_plan(&mut b, cfg);
    xxhash_rust::xxh3::xxh3_128(&b)
}

/// Shards a domain may have for a blob to carry a tag of each (4 bytes a shard), so a
/// refusal can name the shard that changed; larger domains are named as a whole.
pub(super) const TAGGED_SHARDS: usize = 16;

/// One domain's identity for cursor layout 7: its name, settings and bursty phase (the
/// header) and a 128-bit leaf per shard (documents, tokens, content identity). A blob
/// records the identity of the shards it knew, so a resume tells an unchanged domain, a
/// domain with shards appended, and one whose shards changed apart.
#[derive(Debug, Clone)]
pub(super) struct DomainIdentity {
    header: Vec<u8>,
    leaves: Vec<u128>,
    /// The leaves as builds before group sidecars joined a shard's content identity
    /// wrote them, where they differ ([`DomainIdentity::also_accepting`]).
    legacy: Option<Vec<u128>>,
}

impl DomainIdentity {
    /// The identity of `input`, whose bursty phase is `phase`, with `content[k]` the
    /// caller's content identity of shard k (0 where the caller has none).
    pub(super) fn new(input: &DomainInput, phase: Option<u32>, content: &[u128]) -> Self {
        let mut header = vec![SETTINGS_SCHEME];
        header.extend_from_slice(&(input.name.len() as u32).to_le_bytes());
        header.extend_from_slice(input.name.as_bytes());
        encode_settings(&mut header, input.settings);
        match phase {
            None => header.push(0),
            Some(p) => {
                header.push(1);
                header.extend_from_slice(&p.to_le_bytes());
            }
        }
        DomainIdentity {
            header,
            leaves: leaves(input, content),
            legacy: None,
        }
    }

    /// This identity, also matching blobs that recorded the shards' content as
    /// `legacy[k]` (what the build that wrote them computed). A group sidecar shapes a
    /// grouped domain's plan, so it is part of the shard's content now; blobs written
    /// before that keep resuming (unprotected from a rewritten sidecar, as they were),
    /// while a blob written since records the sidecar too, which no legacy leaf equals.
    pub(super) fn also_accepting(mut self, input: &DomainInput, legacy: &[u128]) -> Self {
        let old = leaves(input, legacy);
        self.legacy = (old != self.leaves).then_some(old);
        self
    }

    /// Whether a blob that knew the first `k` shards and recorded `identity` for them
    /// knew them as they are.
    pub(super) fn matches(&self, k: usize, identity: u128) -> bool {
        self.prefix(k) == identity
            || (self.legacy.as_deref()).is_some_and(|l| self.prefix_of(l, k) == identity)
    }

    /// Whether some shard's content identity differs from what earlier builds computed
    /// (a grouped domain with sidecars).
    pub(super) fn has_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    /// Shards the domain has.
    pub(super) fn shards(&self) -> usize {
        self.leaves.len()
    }

    /// The identity of the domain's first `k` shards (all of them for `k >= shards`).
    pub(super) fn prefix(&self, k: usize) -> u128 {
        self.prefix_of(&self.leaves, k)
    }

    fn prefix_of(&self, leaves: &[u128], k: usize) -> u128 {
        let k = k.min(leaves.len());
        let mut b = self.header.clone();
        b.extend_from_slice(&(k as u32).to_le_bytes());
        for leaf in &leaves[..k] {
            b.extend_from_slice(&leaf.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_128(&b)
    }

    /// Per-shard tags a blob carries (empty above [`TAGGED_SHARDS`] shards).
    pub(super) fn tags(&self) -> Vec<u32> {
        self.tags_of(self.leaves.len())
    }

    /// The tags of the first `k` shards, as a blob that knew `k` shards carries them.
    pub(super) fn tags_of(&self, k: usize) -> Vec<u32> {
        if k > TAGGED_SHARDS {
            return Vec::new();
        }
        self.leaves.iter().take(k).map(|&l| l as u32).collect()
    }

    /// The first of a blob's `k` shard tags that differs from ours, as this build or an
    /// earlier one computed them (the later of the two: the other differs from the
    /// first shard with a sidecar on); `None` when the blob carries no tags for them or
    /// they all match one of the two.
    pub(super) fn first_changed(&self, k: usize, tags: &[u32]) -> Option<usize> {
        if tags.len() != k || k > TAGGED_SHARDS {
            return None;
        }
        let first = |leaves: &[u128]| (tags.iter().zip(leaves)).position(|(&t, &l)| t != l as u32);
        let now = first(&self.leaves);
        match (now, self.legacy.as_deref().map(first)) {
            (Some(a), Some(Some(b))) => Some(a.max(b)),
            (now, None) => now,
            _ => None,
        }
    }
}

/// A leaf per shard: its documents, tokens and the caller's content identity (0 where
/// the caller has none).
fn leaves(input: &DomainInput, content: &[u128]) -> Vec<u128> {
    (input.shards.iter().enumerate())
        .map(|(k, (_, s))| {
            let mut b = Vec::with_capacity(32);
            b.extend_from_slice(&s.documents().to_le_bytes());
            b.extend_from_slice(&s.tokens().to_le_bytes());
            b.extend_from_slice(&content.get(k).copied().unwrap_or(0).to_le_bytes());
            xxhash_rust::xxh3::xxh3_128(&b)
        })
        .collect()
}

/// The fingerprint cursor layouts 1-4 carry: xxh3-128 of the manifest and
/// `serde_json::json!` text of the same facts. It exists only so that checkpoints written
/// before layout 5 still resume; its value depends on serde_json's map ordering and
/// number formatting, which is why new blobs no longer use it. Do not change it: a test
/// pins its value.
pub(super) fn legacy_json_fingerprint(
    cfg: &PlanConfig,
    inputs: &[DomainInput],
    manifest: u128,
) -> u128 {
    let static_part = serde_json::json!({
        "seed": cfg.seed,
        "seq_len": cfg.seq_len,
        "global_batch_rows": cfg.global_batch_rows,
        "packing": cfg.packing,
        "window": cfg.best_fit_window,
        "domains": inputs.iter().map(|d| serde_json::json!({
            "name": d.name,
            "settings": d.settings,
            "shards": d.shards.iter().map(|(_, s)| [s.documents(), s.tokens()]).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "layout": 1u16,
    });
    let mut bytes = manifest.to_le_bytes().to_vec();
    bytes.extend_from_slice(static_part.to_string().as_bytes());
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::plan::{Bursty, DomainSettings, GroupMode, Grouping, Packing, Upsample};
    use crate::plan::{DocSource, MemShard};

    /// A fixed config and corpus that set every input the fingerprint reads.
    fn fixed() -> (PlanConfig, Vec<DomainInput>) {
        let text = "seed = 1234\nseq_len = 127\nglobal_batch_rows = 16\npacking = \"concat\"\n\
                    best_fit_window = 512\nweights = { code = 1.0, web = 3.0 }";
        let cfg = PlanConfig::from_table(&toml::from_str(text).unwrap()).unwrap();
        let shard = |lengths: Vec<u32>| {
            Arc::new(MemShard {
                lengths,
                groups: None,
            }) as Arc<dyn DocSource>
        };
        let code = DomainSettings {
            grouping: Grouping {
                mode: GroupMode::Batch,
                max_share: 0.3,
                from_step: 100,
            },
            upsample_long: Some(Upsample {
                min_tokens: 50,
                factor: 3,
            }),
            bursty: Some(Bursty { period: 4 }),
            window: Some(64),
        };
        let inputs = vec![
            DomainInput {
                name: "web".into(),
                shards: vec![
                    ("web/0".into(), shard(vec![5, 7, 11])),
                    ("web/1".into(), shard(vec![13; 40])),
                ],
                settings: DomainSettings::default(),
            },
            DomainInput {
                name: "code".into(),
                shards: vec![("code/0".into(), shard(vec![100, 2, 3, 60]))],
                settings: code,
            },
        ];
        (cfg, inputs)
    }

    /// A named edit of one input.
    type Edit<T> = (&'static str, fn(&mut T));

    const MANIFEST: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;

    /// The value the JSON fingerprint had before the binary one replaced it (computed by
    /// the code of layout 1-4 builds): blobs written then carry it. If this fails,
    /// something changed the JSON text (serde_json's `preserve_order` turned on by any
    /// crate in the tree, a renamed or added settings field) and every old checkpoint
    /// would be refused.
    #[test]
    fn legacy_json_fingerprint_is_pinned() {
        let (cfg, inputs) = fixed();
        assert_eq!(
            format!("{:032x}", legacy_json_fingerprint(&cfg, &inputs, MANIFEST)),
            "b059c319a076b010411f4a50893a2fb4"
        );
    }

    /// The binary encoding is a format: any change to it changes every fingerprint and
    /// refuses every blob of layout 5. Change it only with a new scheme byte and layout.
    #[test]
    fn binary_fingerprint_is_pinned() {
        let (cfg, inputs) = fixed();
        assert_eq!(
            format!("{:032x}", fingerprint(&cfg, &inputs, MANIFEST)),
            "5fb7e661858ec78f28c3c0fb26eb1eab"
        );
    }

    /// The encoding byte by byte, as docs/FORMATS.md describes it, for one domain with
    /// default settings and one shard.
    #[test]
    fn the_encoding_is_the_documented_one() {
        let (mut cfg, mut inputs) = fixed();
        cfg.packing = Packing::BestFit;
        inputs.truncate(1);
        inputs[0].shards.truncate(1);
        let mut want = vec![1u8]; // scheme
        want.extend_from_slice(&MANIFEST.to_le_bytes());
        want.extend_from_slice(&1234u64.to_le_bytes()); // seed
        want.extend_from_slice(&127u32.to_le_bytes()); // seq_len
        want.extend_from_slice(&16u32.to_le_bytes()); // global_batch_rows
        want.push(1); // best_fit
        want.extend_from_slice(&512u64.to_le_bytes()); // window
        want.extend_from_slice(&1u32.to_le_bytes()); // domains
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"web");
        want.push(0); // grouping off
        want.extend_from_slice(&0.25f64.to_bits().to_le_bytes()); // max_share
        want.extend_from_slice(&0u64.to_le_bytes()); // from_step
        want.extend_from_slice(&[0, 0, 0]); // no upsample_long, bursty, window
        want.extend_from_slice(&1u32.to_le_bytes()); // shards
        want.extend_from_slice(&3u64.to_le_bytes()); // documents
        want.extend_from_slice(&23u64.to_le_bytes()); // tokens
        assert_eq!(encode(&cfg, &inputs, MANIFEST), want);
    }

    /// Every input the fingerprint covers moves it; what it leaves to the history digest
    /// (schedule, skips, reseeds) and shard display names do not.
    #[test]
    fn every_static_input_moves_the_fingerprint() {
        let (cfg, inputs) = fixed();
        let base = fingerprint(&cfg, &inputs, MANIFEST);
        let mut seen = vec![base];
        let mut differs = |what: &str, cfg: &PlanConfig, inputs: &[DomainInput], m: u128| {
            let f = fingerprint(cfg, inputs, m);
            assert!(!seen.contains(&f), "{what} did not move the fingerprint");
            seen.push(f);
        };
        differs("manifest", &cfg, &inputs, MANIFEST + 1);
        let edits: Vec<Edit<PlanConfig>> = vec![
            ("seed", |c| c.seed += 1),
            ("seq_len", |c| c.seq_len += 1),
            ("global_batch_rows", |c| c.global_batch_rows += 1),
            ("packing", |c| c.packing = Packing::BestFit),
            ("window", |c| c.best_fit_window += 1),
        ];
        for (what, edit) in edits {
            let mut c = cfg.clone();
            edit(&mut c);
            differs(what, &c, &inputs, MANIFEST);
        }
        let settings: Vec<Edit<DomainSettings>> = vec![
            ("mode", |s| s.grouping.mode = GroupMode::Sequence),
            ("max_share", |s| s.grouping.max_share = 0.31),
            ("from_step", |s| s.grouping.from_step = 101),
            ("upsample", |s| s.upsample_long = None),
            ("min_tokens", |s| {
                s.upsample_long = Some(Upsample {
                    min_tokens: 51,
                    factor: 3,
                })
            }),
            ("factor", |s| {
                s.upsample_long = Some(Upsample {
                    min_tokens: 50,
                    factor: 4,
                })
            }),
            ("bursty", |s| s.bursty = None),
            ("period", |s| s.bursty = Some(Bursty { period: 5 })),
            ("domain window", |s| s.window = None),
            ("domain window value", |s| s.window = Some(65)),
        ];
        for (what, edit) in settings {
            let mut i = inputs.clone();
            edit(&mut i[1].settings);
            differs(what, &cfg, &i, MANIFEST);
        }
        let mut i = inputs.clone();
        i[0].name = "web2".into();
        differs("name", &cfg, &i, MANIFEST);
        let mut i = inputs.clone();
        i[0].shards.pop();
        differs("shard count", &cfg, &i, MANIFEST);
        // Lengths that keep documents and tokens per shard keep the fingerprint (the
        // manifest names content); other counts move it.
        let mut i = inputs.clone();
        i[0].shards[0].1 = Arc::new(MemShard {
            lengths: vec![5, 8, 10],
            groups: None,
        });
        assert_eq!(fingerprint(&cfg, &i, MANIFEST), base);
        i[0].shards[0].1 = Arc::new(MemShard {
            lengths: vec![5, 8, 11],
            groups: None,
        });
        differs("shard tokens", &cfg, &i, MANIFEST);
        i[0].shards[0].1 = Arc::new(MemShard {
            lengths: vec![5, 8, 10, 0],
            groups: None,
        });
        differs("shard documents", &cfg, &i, MANIFEST);
        // Not covered: the schedule and display names.
        let mut c = cfg.clone();
        c.weights = None;
        c.reseed.clear();
        let mut i = inputs.clone();
        i[0].shards[0].0 = "/elsewhere/web/0".into();
        assert_eq!(fingerprint(&c, &i, MANIFEST), base);
    }

    /// Names are length-prefixed: moving a byte from one name to the next moves it.
    #[test]
    fn names_cannot_run_together() {
        let (cfg, mut inputs) = fixed();
        let a = fingerprint(&cfg, &inputs, MANIFEST);
        inputs[0].name = "webc".into();
        inputs[1].name = "ode".into();
        assert_ne!(fingerprint(&cfg, &inputs, MANIFEST), a);
    }

    /// Layout 7's plan-wide fingerprint and a domain's identity are formats too: pinned.
    /// The settings fingerprint ignores the corpus; a domain's identity ignores the other
    /// domains and moves with its own shards (a prefix of them names the shards a blob
    /// knew).
    #[test]
    fn layout_7_identities_are_pinned() {
        let (cfg, inputs) = fixed();
        assert_eq!(
            format!("{:032x}", settings_fingerprint(&cfg)),
            "ad63f30a362e861bae9a7b5c5b5cc1fe"
        );
        let web = DomainIdentity::new(&inputs[0], None, &[7, 8]);
        assert_eq!(
            format!("{:032x}", web.prefix(2)),
            "e45e1a1811c2324b37e002dcb76c67a4"
        );
        let alone = DomainIdentity::new(&inputs[0], None, &[7, 8]);
        assert_eq!(alone.prefix(2), web.prefix(2));
        assert_ne!(web.prefix(1), web.prefix(2));
        let mut one = inputs[0].clone();
        one.shards.truncate(1);
        assert_eq!(
            DomainIdentity::new(&one, None, &[7]).prefix(1),
            web.prefix(1)
        );
        for other in [
            DomainIdentity::new(&inputs[0], None, &[7, 9]),
            DomainIdentity::new(&inputs[0], Some(0), &[7, 8]),
            DomainIdentity::new(&inputs[0], None, &[]),
        ] {
            assert_ne!(other.prefix(2), web.prefix(2));
        }
        assert_eq!(web.tags().len(), 2);
        assert_eq!(web.tags_of(1), web.tags()[..1]);
    }

    /// Shard content that now covers a group sidecar (9 instead of 8 for shard 1)
    /// matches blobs that recorded it either way, old builds' (8) and new ones' (9),
    /// but not a blob that knew another sidecar (10); identities without a difference
    /// keep no legacy leaves.
    #[test]
    fn an_identity_accepts_what_earlier_builds_recorded() {
        let (_, inputs) = fixed();
        let now =
            DomainIdentity::new(&inputs[0], None, &[7, 9]).also_accepting(&inputs[0], &[7, 8]);
        assert!(now.has_legacy());
        let old_build = DomainIdentity::new(&inputs[0], None, &[7, 8]).prefix(2);
        let new_build = DomainIdentity::new(&inputs[0], None, &[7, 9]).prefix(2);
        let other = DomainIdentity::new(&inputs[0], None, &[7, 10]).prefix(2);
        assert!(now.matches(2, old_build) && now.matches(2, new_build));
        assert!(!now.matches(2, other));
        assert!(now.matches(1, old_build_prefix(&inputs[0])));
        assert_eq!(now.prefix(2), new_build, "blobs record the new identity");
        // A blob's tags name the shard that changed whichever build wrote them.
        let tags = |c: &[u128]| DomainIdentity::new(&inputs[0], None, c).tags();
        assert_eq!(now.first_changed(2, &tags(&[7, 8])), None);
        assert_eq!(now.first_changed(2, &tags(&[7, 9])), None);
        assert_eq!(now.first_changed(2, &tags(&[7, 10])), Some(1));
        assert_eq!(now.first_changed(2, &tags(&[6, 8])), Some(0));
        let same =
            DomainIdentity::new(&inputs[0], None, &[7, 8]).also_accepting(&inputs[0], &[7, 8]);
        assert!(!same.has_legacy());
    }

    fn old_build_prefix(input: &DomainInput) -> u128 {
        DomainIdentity::new(input, None, &[7, 8]).prefix(1)
    }
}
