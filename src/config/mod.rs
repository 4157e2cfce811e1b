//! The millrace config file (TOML), every table of it: this file reads the file and
//! holds `[corpus]` (which shards form which domain, and where derived indexes go);
//! [`plan`] holds `[plan]` and a domain's planning keys (pure data and checks: the
//! planner depends on it); [`serve`] holds `[serve]`.
//!
//! One file describes a run; every command (`inspect --config`, `plan`, `serve`) reads
//! the same one. Relative shard paths are resolved against the config file's own
//! directory, so a corpus and its config can move together (what `millrace synth`
//! writes relies on this). The `[plan]` and `[serve]` tables are kept as TOML until
//! [`Config::plan_config`] and [`serve::ServeConfig::from_config`] read them, so a
//! command that needs only the corpus is not refused for a mistake in the others.

pub mod plan;
pub mod serve;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::corpus::{self, DType, Format, RawOptions, Shard};
use crate::plan::{DomainInput, Plan};
use plan::{DomainSettings, PlanConfig};
use std::sync::Arc;

/// Most domains a config may name: every cursor blob lists every domain, and a blob's
/// lists hold at most 4096 entries (`plan/cursor.rs`), so a run of more could not
/// resume from its own blobs.
pub const MAX_DOMAINS: usize = 4096;

/// Longest domain name, in bytes: every cursor blob carries each name, and a blob's
/// lists (a name's bytes among them) hold at most 4096 entries, so a longer name made
/// blobs its own daemon could not read back.
pub const MAX_NAME: usize = 4096;

/// The largest config file read: 4,096 domains of 4,096-byte names and a schedule of
/// many points take a few tens of MB.
pub const MAX_CONFIG_BYTES: u64 = 256 << 20;

/// Why a config could not be used; always names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not UTF-8, so it cannot be TOML.
    #[error("{path}: not UTF-8 at byte {byte}")]
    NotUtf8 {
        /// The config file.
        path: PathBuf,
        /// Offset of the first byte that is not valid UTF-8.
        byte: usize,
    },
    /// TOML syntax or a field of the wrong type (one line: line, column and cause).
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's message, which points at the line.
        message: String,
    },
    /// The TOML parsed but a value is not acceptable.
    #[error("{path}: {field}: {what}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted field path, e.g. `corpus.domain[2].raw.eos`.
        field: String,
        /// What is wrong with it.
        what: String,
    },
    /// The `[plan]` table, or a domain's planning keys, cannot be planned.
    #[error("{path}: {message}")]
    Plan {
        /// The config file.
        path: PathBuf,
        /// The plan's message (names the field).
        message: String,
    },
    /// A shard named by the config failed to open.
    #[error("domain {domain}: {source}")]
    Corpus {
        /// The domain the shard belongs to.
        domain: String,
        /// The shard's own error (file and offset).
        source: corpus::CorpusError,
    },
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shards and domains.
    pub corpus: CorpusConfig,
    /// Batch planning, read by [`Config::plan_config`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<toml::Table>,
    /// Daemon settings, read by [`serve::ServeConfig::from_config`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<toml::Table>,
    /// Directory that relative paths are resolved against (the config file's own).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the config was read from, for messages.
    #[serde(skip)]
    pub source: PathBuf,
    /// The text parsed, so that a mistake found when `[plan]` or `[serve]` is read (they
    /// are kept as tables until then, which drops positions) can name its line.
    #[serde(skip)]
    text: String,
}

/// `[corpus]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Where derived data goes (raw-array boundaries, shard identities, plan
    /// checkpoints); never the corpus itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The domains, in the order that ids are assigned.
    #[serde(rename = "domain")]
    pub domains: Vec<DomainConfig>,
}

/// `[[corpus.domain]]`: one source of data with its own mixture weight.
///
/// Its planning keys sit in the same table as its shards but belong to the planner, so
/// they are declared once, in [`DomainSettings`], and read into it by the hand-written
/// `Deserialize` below: serde's `flatten` would do the same but lose the line and
/// column of every mistake in them, and the list of keys an unknown one is refused with.
#[derive(Debug, Clone, Serialize)]
pub struct DomainConfig {
    /// Unique name, used by weights and reports.
    pub name: String,
    /// Prefixes, directories or globs.
    pub shards: Vec<PathBuf>,
    /// Shard format of this domain.
    pub format: Format,
    /// Required for `format = "raw"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawConfig>,
    /// `grouping`, `upsample_long`, `bursty` and `window`, validated by the plan.
    #[serde(flatten)]
    pub settings: DomainSettings,
}

/// The keys of a `[[corpus.domain]]` table, in the order error messages list them.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DomainKey {
    Name,
    Shards,
    Format,
    Raw,
    Grouping,
    UpsampleLong,
    Bursty,
    Window,
}

impl<'de> Deserialize<'de> for DomainConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const KEYS: &[&str] = &[
            "name",
            "shards",
            "format",
            "raw",
            "grouping",
            "upsample_long",
            "bursty",
            "window",
        ];
        d.deserialize_struct("DomainConfig", KEYS, DomainVisitor)
    }
}

/// Reads a domain table key by key, each value straight from the TOML deserializer, so
/// a mistake is reported at its own line and column, as a derived impl would.
struct DomainVisitor;

impl<'de> serde::de::Visitor<'de> for DomainVisitor {
    type Value = DomainConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("struct DomainConfig")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<DomainConfig, A::Error> {
        use serde::de::Error;
        // TOML itself refuses a key given twice, before serde sees the table.
        let (mut name, mut shards, mut format, mut raw) = (None, None, None, None);
        let mut settings = DomainSettings::default();
        while let Some(key) = map.next_key()? {
            match key {
                DomainKey::Name => name = Some(map.next_value()?),
                DomainKey::Shards => shards = Some(map.next_value()?),
                DomainKey::Format => format = Some(map.next_value()?),
                DomainKey::Raw => raw = map.next_value()?,
                DomainKey::Grouping => settings.grouping = map.next_value()?,
                DomainKey::UpsampleLong => settings.upsample_long = map.next_value()?,
                DomainKey::Bursty => settings.bursty = map.next_value()?,
                DomainKey::Window => settings.window = map.next_value()?,
            }
        }
        Ok(DomainConfig {
            name: name.ok_or_else(|| A::Error::missing_field("name"))?,
            shards: shards.ok_or_else(|| A::Error::missing_field("shards"))?,
            format: format.unwrap_or_default(),
            raw,
            settings,
        })
    }

    /// A domain written as an array, values in key order: serde's derived impl accepts
    /// that, so the same files still parse.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DomainConfig, A::Error> {
        use serde::de::Error;
        let expected = &"struct DomainConfig with 8 elements";
        Ok(DomainConfig {
            name: seq
                .next_element()?
                .ok_or_else(|| A::Error::invalid_length(0, expected))?,
            shards: seq
                .next_element()?
                .ok_or_else(|| A::Error::invalid_length(1, expected))?,
            format: seq.next_element()?.unwrap_or_default(),
            raw: seq.next_element()?.flatten(),
            settings: DomainSettings {
                grouping: seq.next_element()?.unwrap_or_default(),
                upsample_long: seq.next_element()?.flatten(),
                bursty: seq.next_element()?.flatten(),
                window: seq.next_element()?.flatten(),
            },
        })
    }
}

/// A plan built from a config, with the shards it reads (the daemon copies tokens from
/// the same mappings).
pub struct LoadedPlan {
    /// The plan.
    pub plan: Arc<Plan>,
    /// Shards per domain, in config order.
    pub shards: Vec<Vec<Arc<Shard>>>,
}

/// `[corpus.domain.raw]`: what a Megatron header would say, for headerless token files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `uint16` or `uint32`.
    pub dtype: DType,
    /// The id that ends each document.
    pub eos: u64,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_hashed(path).map(|(cfg, _)| cfg)
    }

    /// As [`Config::load`], with the hash of exactly the bytes parsed: the daemon's
    /// watcher compares the file against what was applied, not against a later read.
    pub fn load_hashed(path: &Path) -> Result<(Config, u64), ConfigError> {
        let bytes = Config::read_bytes(path)?;
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        Ok((Config::from_bytes(path, bytes)?, hash))
    }

    /// The bytes of the config file `path`, which must be a regular file of at most
    /// [`MAX_CONFIG_BYTES`]: the daemon rereads its config on SIGHUP and every watcher
    /// tick, and a path replaced by a FIFO (whose open waits for a writer) or by
    /// `/dev/zero` (endless) hung the reload, or grew the daemon without bound.
    pub fn read_bytes(path: &Path) -> Result<Vec<u8>, ConfigError> {
        crate::util::read_regular(path, Some((MAX_CONFIG_BYTES, "a config"))).map_err(|source| {
            ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Parses the bytes read from the config file `path` (the hash of
    /// [`Config::load_hashed`] is `xxh3_64` of these bytes, parsed or not).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Config, ConfigError> {
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::NotUtf8 {
            path: path.to_path_buf(),
            byte: e.utf8_error().valid_up_to(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::parse(&text, path, base)
    }

    /// Parses config text; `source` names it in errors, `base_dir` anchors relative paths.
    pub fn parse(text: &str, source: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_path_buf(),
            message: toml_message(&e, text),
        })?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.source = source.to_path_buf();
        cfg.text = text.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, field: String, what: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            field,
            what: what.into(),
        }
    }

    /// Checks what serde cannot: names, uniqueness, and format-specific fields.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.corpus.domains.is_empty() {
            return Err(self.invalid("corpus.domain".into(), "at least one domain is needed"));
        }
        if self.corpus.domains.len() > MAX_DOMAINS {
            return Err(self.invalid(
                "corpus.domain".into(),
                format!(
                    "{} domains; at most {MAX_DOMAINS} (every cursor blob lists every domain)",
                    self.corpus.domains.len()
                ),
            ));
        }
        if let Some(what) = self.corpus.cache_dir.as_deref().and_then(path_problem) {
            return Err(self.invalid("corpus.cache_dir".into(), what));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.corpus.domains.iter().enumerate() {
            let f = |name: &str| format!("corpus.domain[{i}].{name}");
            let ok_name = !d.name.is_empty()
                && d.name.len() <= MAX_NAME
                && d.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
            if !ok_name {
                return Err(self.invalid(
                    f("name"),
                    format!(
                        "{:?} must be 1 to {MAX_NAME} ASCII letters, digits, '_', '-' or '.'",
                        d.name
                    ),
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(self.invalid(f("name"), format!("domain {:?} appears twice", d.name)));
            }
            if d.shards.is_empty() {
                return Err(self.invalid(f("shards"), "lists no shard"));
            }
            for (j, shard) in d.shards.iter().enumerate() {
                if let Some(what) = path_problem(shard) {
                    return Err(self.invalid(f(&format!("shards[{j}]")), what));
                }
            }
            match (d.format, &d.raw) {
                (Format::Raw, None) => {
                    return Err(self.invalid(
                        f("raw"),
                        "format = \"raw\" needs raw = { dtype = \"uint16\"|\"uint32\", eos = ID }",
                    ))
                }
                (Format::Megatron, Some(_)) => return Err(self.invalid(
                    f("raw"),
                    "only format = \"raw\" takes a raw table (Megatron shards carry their dtype)",
                )),
                (Format::Raw, Some(r)) => {
                    if !matches!(r.dtype, DType::Uint16 | DType::Uint32) {
                        return Err(self.invalid(
                            f("raw.dtype"),
                            format!("{} is not a raw token dtype (uint16 or uint32)", r.dtype),
                        ));
                    }
                    let max = if r.dtype == DType::Uint16 {
                        u64::from(u16::MAX)
                    } else {
                        u64::from(u32::MAX)
                    };
                    if r.eos > max {
                        return Err(self.invalid(
                            f("raw.eos"),
                            format!("{} does not fit in {}", r.eos, r.dtype),
                        ));
                    }
                    // Every document of a raw domain but perhaps its file's last ends
                    // with `eos`: one outside the vocabulary stops every ring that reads
                    // the domain at its first row, which `check-config` can say now.
                    let vocab = (self.plan.as_ref())
                        .and_then(|p| p.get("vocab_size"))
                        .and_then(|v| v.as_integer())
                        .and_then(|v| u64::try_from(v).ok());
                    if let Some(v) = vocab.filter(|&v| r.eos >= v) {
                        return Err(self.invalid(
                            f("raw.eos"),
                            format!(
                                "{} is not below plan.vocab_size = {v}: the domain's documents \
                                 end with it, so every ring reading them would stop with \
                                 ERROR materialize",
                                r.eos
                            ),
                        ));
                    }
                }
                (Format::Megatron, None) => {}
            }
        }
        Ok(())
    }

    /// `p` made absolute against the config's directory.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The raw-reader options of domain `d`, if it is a raw domain.
    pub fn raw_options(&self, d: &DomainConfig) -> Option<RawOptions> {
        d.raw.as_ref().map(|r| RawOptions {
            dtype: r.dtype,
            eos: r.eos,
            cache_dir: self.corpus.cache_dir.as_ref().map(|c| self.resolve_path(c)),
        })
    }

    /// Opens every shard of every domain, in config order.
    pub fn open_corpus(&self) -> Result<Vec<(String, Vec<Shard>)>, ConfigError> {
        let opened = par_map(&self.shard_paths()?, |(d, path)| {
            let domain = &self.corpus.domains[*d];
            Shard::open(path, self.raw_options(domain).as_ref())
                .map(|s| (*d, s))
                .map_err(|source| ConfigError::Corpus {
                    domain: domain.name.clone(),
                    source,
                })
        });
        self.group_by_domain(opened)
    }

    /// Every shard path with its domain index, resolved and sorted, refusing a shard
    /// listed twice, or a corpus whose mappings would pass the kernel's limit
    /// ([`corpus::maps`]: past it a start aborted without a word).
    fn shard_paths(&self) -> Result<Vec<(usize, PathBuf)>, ConfigError> {
        let paths = self.shard_paths_unchecked()?;
        // Two mappings a shard, kept: `.bin` and `.idx`, or a raw file and its boundary
        // cache. A group sidecar is mapped only while its runs are read (a review found
        // grouped corpora refused when it was counted as a third).
        let needed = 2 * paths.len() as u64;
        if let Some(what) = corpus::maps::mapping_problem(paths.len(), needed) {
            return Err(self.invalid("corpus".into(), what));
        }
        Ok(paths)
    }

    /// [`Config::shard_paths`] without the mapping check.
    fn shard_paths_unchecked(&self) -> Result<Vec<(usize, PathBuf)>, ConfigError> {
        let mut out = Vec::new();
        let mut seen: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
        let mut dirs = std::collections::HashMap::new();
        let mut inodes: std::collections::HashMap<(u64, u64), (PathBuf, String)> =
            std::collections::HashMap::new();
        for (i, d) in self.corpus.domains.iter().enumerate() {
            let wrap = |source| ConfigError::Corpus {
                domain: d.name.clone(),
                source,
            };
            for arg in &d.shards {
                for path in corpus::resolve(&self.resolve_path(arg), d.format).map_err(wrap)? {
                    // Identify files, not spellings: `a/../a/x` and `a/x` are one shard.
                    let file = match d.format {
                        Format::Megatron => corpus::megatron::with_suffix(&path, "idx"),
                        Format::Raw => path.clone(),
                    };
                    let key = canonical_file(&file, &mut dirs).unwrap_or_else(|| path.clone());
                    if let Some(first) = seen.insert(key, d.name.clone()) {
                        let place = match first == d.name {
                            true => format!("in domain {first}"),
                            false => format!("(in domain {first} and in domain {})", d.name),
                        };
                        return Err(ConfigError::Invalid {
                            path: self.source.clone(),
                            field: format!("corpus.domain[{i}].shards"),
                            what: format!(
                                "shard {} is listed twice {place}; it would be read twice as often \
                                 as its weight says",
                                path.display(),
                            ),
                        });
                    }
                    // And files, not names: a hard link (a `cp -al` snapshot listed
                    // beside its source) is the same shard under another path.
                    let inode = std::fs::metadata(&file).ok().map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        (m.dev(), m.ino())
                    });
                    if let Some((first_path, first)) =
                        inode.and_then(|k| inodes.insert(k, (path.clone(), d.name.clone())))
                    {
                        return Err(ConfigError::Invalid {
                            path: self.source.clone(),
                            field: format!("corpus.domain[{i}].shards"),
                            what: format!(
                                "shard {} (domain {}) is the same file as shard {} (domain \
                                 {first}), a hard link; it would be read twice as often as its \
                                 weight says",
                                path.display(),
                                d.name,
                                first_path.display()
                            ),
                        });
                    }
                    out.push((i, path));
                }
            }
        }
        Ok(out)
    }

    /// Regroups per-shard results (in `shard_paths` order) by domain, keeping the first
    /// error.
    fn group_by_domain<T>(
        &self,
        items: Vec<Result<(usize, T), ConfigError>>,
    ) -> Result<Vec<(String, Vec<T>)>, ConfigError> {
        let mut out: Vec<(String, Vec<T>)> = self
            .corpus
            .domains
            .iter()
            .map(|d| (d.name.clone(), Vec::new()))
            .collect();
        for item in items {
            let (d, t) = item?;
            out[d].1.push(t);
        }
        Ok(out)
    }

    /// The validated `[plan]` table.
    pub fn plan_config(&self) -> Result<PlanConfig, ConfigError> {
        let table = self.plan.clone().ok_or_else(|| {
            self.invalid(
                "plan".into(),
                "no [plan] table (seed, seq_len, global_batch_rows, weights)",
            )
        })?;
        /// `[plan]` alone, read from the text for the position of a mistake.
        #[derive(Deserialize)]
        struct PlanOnly {
            #[allow(dead_code)]
            plan: PlanConfig,
        }
        let cfg = PlanConfig::from_table(&table).map_err(|e| ConfigError::Plan {
            path: self.source.clone(),
            message: format!("{e}{}", self.position_of::<PlanOnly>()),
        })?;
        let settings: Vec<(&str, DomainSettings)> = self
            .corpus
            .domains
            .iter()
            .map(|d| (d.name.as_str(), d.settings))
            .collect();
        cfg.validate(&settings).map_err(|e| ConfigError::Plan {
            path: self.source.clone(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Opens every shard, identifies the corpus by content, and builds the plan: what
    /// `serve`, `plan` and `explain` do at start. Time and memory grow with shards, not
    /// documents: each shard gets its O(1) open checks and an identity from the cache
    /// ([`corpus::IdentityCache`]); the full pass over each index is left to
    /// [`Self::load_plan_validated`] (`check-config`) and to the daemon's background check,
    /// while every read re-checks the document it reads (docs/DESIGN.md).
    pub fn load_plan(&self) -> Result<LoadedPlan, ConfigError> {
        self.load_plan_with(false)
    }

    /// [`Self::load_plan`] with the full linear validation of every index and identities
    /// computed in full (and written to the cache, so the next start finds them): what
    /// `check-config` runs, so a corrupt shard is reported before a start.
    pub fn load_plan_validated(&self) -> Result<LoadedPlan, ConfigError> {
        self.load_plan_with(true)
    }

    /// The identity cache this config uses: `[corpus] cache_dir`, else the per-user one.
    pub fn identity_cache(&self) -> corpus::IdentityCache {
        let dir = self.corpus.cache_dir.as_ref().map(|c| self.resolve_path(c));
        corpus::IdentityCache::new(dir.as_deref())
    }

    /// This is the I/O edge in front of the pure planner. Shards are opened (and, when
    /// `validate`, checked in full) on all cores; the results are combined in config
    /// order, so the manifest never depends on which thread finished first.
    fn load_plan_with(&self, validate: bool) -> Result<LoadedPlan, ConfigError> {
        let cfg = self.plan_config()?;
        let cache = self.identity_cache();
        let opened = par_map(&self.shard_paths()?, |(d, path)| {
            let domain = &self.corpus.domains[*d];
            let wrap = |source| ConfigError::Corpus {
                domain: domain.name.clone(),
                source,
            };
            let (shard, id) = cache
                .open(path, self.raw_options(domain).as_ref(), validate)
                .map_err(wrap)?;
            // Listed here, on all cores, from the cache when it has them: the planner
            // would otherwise read every length of the domain at each start. One list
            // per threshold: the domain's own and its stages' (`[[plan.stage]]
            // upsample_long`).
            let long: Vec<corpus::LongUnits> = long_thresholds(&cfg, domain)
                .into_iter()
                .map(|t| cache.long_units(&shard, &id, t))
                .collect();
            let id = serde_json::to_string(&id).unwrap_or_default();
            Ok((*d, (shard, id, long)))
        });
        let corpus = self.group_by_domain(opened)?;
        let mut manifest = xxhash_rust::xxh3::Xxh3::new();
        let mut inputs = Vec::with_capacity(corpus.len());
        let mut shards_out = Vec::with_capacity(corpus.len());
        // Per shard, its content identity as each domain's own identity (cursor layout 7)
        // records it, so a blob names the shard that changed.
        let mut content = Vec::with_capacity(corpus.len());
        // The same without group sidecars, as builds before 2026-12-06 recorded it.
        let mut legacy = Vec::with_capacity(corpus.len());
        for ((name, shards), d) in corpus.into_iter().zip(&self.corpus.domains) {
            let grouped = d.settings.grouping.mode != plan::GroupMode::Off;
            manifest.update(name.as_bytes());
            manifest.update(&[0]);
            let mut list: Vec<(String, Arc<dyn crate::plan::DocSource>)> = Vec::new();
            let mut arcs = Vec::with_capacity(shards.len());
            let mut ids = Vec::with_capacity(shards.len());
            let mut before = Vec::with_capacity(shards.len());
            for (shard, id, long) in shards {
                manifest.update(id.as_bytes());
                manifest.update(&[0]);
                let plain = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
                before.push(plain);
                // A grouped domain's sidecar decides its units, so it is content: a
                // rewritten one refuses blobs and checkpoints that knew the old one.
                ids.push(match shard.groups().filter(|_| grouped) {
                    Some(g) => {
                        let runs = corpus::Groups::encoded_sum(&g.encode()).unwrap_or_default();
                        let mut b = id.clone().into_bytes();
                        b.extend_from_slice(b"\0groups\0");
                        b.extend_from_slice(&runs.to_le_bytes());
                        xxhash_rust::xxh3::xxh3_128(&b)
                    }
                    None => plain,
                });
                let shard = Arc::new(shard);
                let source: Arc<dyn crate::plan::DocSource> = if long.is_empty() {
                    shard.clone()
                } else {
                    Arc::new(corpus::Listed {
                        source: shard.clone(),
                        long,
                    })
                };
                list.push((shard.path().display().to_string(), source));
                arcs.push(shard);
            }
            inputs.push(DomainInput {
                name: name.clone(),
                shards: list,
                settings: d.settings,
            });
            shards_out.push(arcs);
            content.push(ids);
            legacy.push(before);
        }
        let plan = Plan::with_content_since(&inputs, cfg, manifest.digest128(), &content, &legacy)
            .map_err(|e| ConfigError::Plan {
                path: self.source.clone(),
                message: e.to_string(),
            })?;
        Ok(LoadedPlan {
            plan: Arc::new(plan),
            shards: shards_out,
        })
    }
}

/// Why `p` cannot be meant as written: it is empty, holds a NUL byte (no file's path
/// does), or starts with `~`, which only a shell expands. Taken as a relative path it would name the config's directory, or a
/// directory called `~` beside the config (one a later `rm -rf ~` meant to clean up
/// would miss), so it is refused, not guessed at.
pub fn path_problem(p: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    // An empty path would name the config's own directory.
    if p.as_os_str().is_empty() {
        return Some(
            "is empty (it would name the config's own directory); leave the key out for \
             the default, or write \".\" if that directory is meant"
                .into(),
        );
    }
    if p.as_os_str().as_bytes().contains(&0) {
        return Some(format!(
            "{:?} contains a NUL byte, which no path may",
            p.as_os_str()
        ));
    }
    let first = match p.components().next() {
        Some(std::path::Component::Normal(c)) => c,
        _ => return None,
    };
    first.as_bytes().starts_with(b"~").then(|| {
        format!(
            "{:?} starts with `~`, which is not expanded here (only a shell does that): \
             write the absolute path (or `./{}` for a name that starts with `~` beside \
             the config)",
            p.display().to_string(),
            p.display()
        )
    })
}

/// The thresholds whose long-unit lists the plan reads for `domain`: its own
/// `upsample_long`'s and each stage's for it, distinct, in config order.
fn long_thresholds(cfg: &plan::PlanConfig, domain: &DomainConfig) -> Vec<u64> {
    let own = domain.settings.upsample_long.map(|u| u.min_tokens);
    let stages = (cfg.stage.iter())
        .filter_map(|st| st.upsample_long.get(&domain.name))
        .filter_map(|u| u.setting().map(|u| u.min_tokens));
    let mut out: Vec<u64> = Vec::new();
    for t in own.into_iter().chain(stages) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// `file`'s canonical path, its directory canonicalized once per directory
/// ([`corpus::identity::in_canonical_dir`]); only a file that is itself a symbolic link
/// (one `readlink` tells) is canonicalized whole.
fn canonical_file(
    file: &Path,
    dirs: &mut std::collections::HashMap<PathBuf, PathBuf>,
) -> Option<PathBuf> {
    match std::fs::read_link(file) {
        Ok(_) => std::fs::canonicalize(file).ok(),
        Err(_) => corpus::identity::in_canonical_dir(file, dirs),
    }
}

/// Maps `f` over `items` on all cores (rayon's pool), returning results in `items`
/// order: opening thousands of shards is I/O-bound per shard and independent.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    items.par_iter().map(f).collect()
}

impl Config {
    /// " (line L, column C)" where the kept text fails to read as `T`, or "" when it
    /// reads (or the config was not parsed from text): the suffix of a mistake found in a
    /// table read after the file was parsed.
    pub(crate) fn position_of<T: serde::de::DeserializeOwned>(&self) -> String {
        match toml::from_str::<T>(&self.text) {
            Err(e) => text_position(&e, &self.text)
                .map(|(line, column)| format!(" (line {line}, column {column})"))
                .unwrap_or_default(),
            Ok(_) => String::new(),
        }
    }
}

/// The line and column (from 1) of a TOML mistake in `text`, when the error has a span.
fn text_position(e: &toml::de::Error, text: &str) -> Option<(usize, usize)> {
    let span = e.span()?;
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    Some((line, column))
}

/// toml's error as one line, "line L, column C: cause", so a log line carries the
/// cause (toml's own rendering draws the source line and puts the cause below it).
pub fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let cause = plan::one_line(e.message());
    match text_position(e, text) {
        Some((line, column)) => {
            format!("TOML parse error at line {line}, column {column}: {cause}")
        }
        None => format!("TOML parse error: {cause}"),
    }
}
