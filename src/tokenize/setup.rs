//! tokenize, Set-up: the tokenizer, its EOS and the output dtype.

use super::*;

// ---------------------------------------------------------------------------------------
// Set-up: the tokenizer, the EOS, the dtype.

/// What every worker needs, resolved once.
pub(super) struct Setup {
    pub(super) tokenizer: Tokenizer,
    pub(super) eos: Option<u32>,
    pub(super) dtype: DType,
    pub(super) vocab: u64,
    /// xxh3-64 of the tokenizer file, for the manifest.
    pub(super) tokenizer_hash: u64,
    pub(super) text_field: String,
    pub(super) group_field: Option<String>,
    pub(super) order_field: Option<String>,
    pub(super) grouped: bool,
    pub(super) max_line: u64,
}

impl Setup {
    pub(super) fn new(opts: &TokenizeOptions) -> Result<Setup> {
        if opts.order_field.is_some() && opts.group_field.is_none() {
            return Err(TokenizeError::Options(
                "--order-field orders documents within a group; it needs --group-field".into(),
            ));
        }
        for f in [&opts.group_field, &opts.order_field].into_iter().flatten() {
            if *f == opts.text_field {
                return Err(TokenizeError::Options(format!(
                    "field {f:?} cannot be both the text and a group or order key"
                )));
            }
        }
        if let (Some(g), Some(o)) = (&opts.group_field, &opts.order_field) {
            if g == o {
                return Err(TokenizeError::Options(format!(
                    "--group-field and --order-field are both {g:?}"
                )));
            }
        }
        let path = &opts.tokenizer;
        let tok_err = |what: String| TokenizeError::Tokenizer {
            path: path.clone(),
            what,
        };
        let bytes = std::fs::read(path).map_err(io_err(path, "read"))?;
        let tokenizer_hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        let mut tokenizer = load_tokenizer(&bytes)
            .map_err(|e| tok_err(format!("cannot load a HuggingFace tokenizer.json: {e}")))?;
        // A tokenizer.json may carry truncation (e.g. to 512) or padding meant for
        // fine-tuning; either would silently change documents here.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(format!("cannot disable truncation: {e}")))?;
        tokenizer.with_padding(None);

        let vocab = tokenizer
            .get_vocab(true)
            .values()
            .map(|&id| u64::from(id) + 1)
            .max()
            .unwrap_or(0);
        if vocab == 0 {
            return Err(tok_err("the tokenizer has an empty vocabulary".into()));
        }
        let eos = match &opts.eos {
            Eos::Off => None,
            Eos::Id(id) => {
                if u64::from(*id) >= vocab {
                    return Err(tok_err(format!(
                        "--eos-id {id} is outside the vocabulary (ids 0..{vocab})"
                    )));
                }
                Some(*id)
            }
            Eos::Token(t) => Some(
                tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| tok_err(format!("no token {t:?} in the vocabulary")))?,
            ),
            Eos::Auto => Some(discover_eos(&tokenizer, path)?),
        };
        let dtype = opts
            .dtype
            .unwrap_or_else(|| crate::util::default_dtype(vocab.min(u64::from(u32::MAX)) as u32));
        let max = max_id(dtype).ok_or_else(|| {
            TokenizeError::Options(format!(
                "--dtype {dtype} cannot hold token ids in a Megatron shard \
                 (use uint16 or int32)"
            ))
        })?;
        if vocab - 1 > max {
            return Err(TokenizeError::Options(format!(
                "the tokenizer's largest id is {}, which {dtype} cannot hold (at most {max})",
                vocab - 1
            )));
        }
        if opts.max_line_bytes == 0 {
            return Err(TokenizeError::Options(
                "--max-line-bytes 0 would skip every line".into(),
            ));
        }
        let grouped = opts.group_field.is_some();
        Ok(Setup {
            tokenizer,
            eos,
            dtype,
            vocab,
            tokenizer_hash,
            text_field: opts.text_field.clone(),
            group_field: opts.group_field.clone(),
            order_field: opts.order_field.clone(),
            grouped,
            max_line: opts.max_line_bytes,
        })
    }

    pub(super) fn worker(&self, gate: &Arc<EncodeGate>, share: Option<Share>) -> Worker {
        Worker {
            tokenizer: self.tokenizer.clone(),
            eos: self.eos,
            dtype: self.dtype,
            max: max_id(self.dtype).unwrap_or(0),
            text_field: self.text_field.clone(),
            group_field: self.group_field.clone(),
            order_field: self.order_field.clone(),
            grouped: self.grouped,
            max_line: self.max_line,
            gate: gate.clone(),
            share,
        }
    }
}

/// `Tokenizer::from_bytes`, with a panic inside the tokenizers library (it panics on
/// some malformed files, e.g. a `Precompiled` normalizer whose charsmap does not decode)
/// turned into an error, so that the run fails naming the tokenizer file.
fn load_tokenizer(bytes: &[u8]) -> std::result::Result<Tokenizer, String> {
    // The known case is checked first, for an error without the panic's backtrace.
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Some(normalizer) = json.get("normalizer") {
            check_precompiled(normalizer)?;
        }
    }
    match super::catch_quietly(|| Tokenizer::from_bytes(bytes)) {
        Ok(loaded) => loaded.map_err(|e| e.to_string()),
        Err(panic) => Err(format!(
            "the tokenizers library panicked reading it: {}",
            panic_message(panic.as_ref())
        )),
    }
}

/// Fails on a `Precompiled` normalizer (alone or in a `Sequence`) whose charsmap the
/// tokenizers library cannot read: loading such a file panics inside the library.
fn check_precompiled(normalizer: &serde_json::Value) -> std::result::Result<(), String> {
    if normalizer.get("type").and_then(|t| t.as_str()) == Some("Precompiled") {
        serde_json::from_str::<tokenizers::normalizers::Precompiled>(&normalizer.to_string())
            .map_err(|e| format!("its Precompiled normalizer cannot be read: {e}"))?;
    }
    let inner = normalizer.get("normalizers").and_then(|n| n.as_array());
    for n in inner.into_iter().flatten() {
        check_precompiled(n)?;
    }
    Ok(())
}

/// The largest token id `dtype` holds in a Megatron shard; `None` for float dtypes and
/// for uint32, which Megatron has no code for.
pub(super) fn max_id(dtype: DType) -> Option<u64> {
    match dtype {
        DType::Uint8 => Some(u64::from(u8::MAX)),
        DType::Int8 => Some(i8::MAX as u64),
        DType::Int16 => Some(i16::MAX as u64),
        DType::Uint16 => Some(u64::from(u16::MAX)),
        DType::Int32 => Some(i32::MAX as u64),
        DType::Int64 => Some(u64::from(u32::MAX)),
        DType::Float32 | DType::Float64 | DType::Uint32 => None,
    }
}

/// The tokenizer's EOS: `tokenizer_config.json`'s `eos_token` when that file sits beside
/// the tokenizer, else a special token with one of the usual EOS spellings.
pub(super) fn discover_eos(tokenizer: &Tokenizer, path: &Path) -> Result<u32> {
    let err = |what: String| TokenizeError::Tokenizer {
        path: path.to_path_buf(),
        what,
    };
    let config = path.with_file_name("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&config) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "{} beside it is not valid JSON ({e}); pass --eos-id or --eos-token",
                config.display()
            ))
        })?;
        let name = match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(o) => o.get("content").and_then(|c| c.as_str()),
            None => None,
        };
        if let Some(name) = name {
            return tokenizer.token_to_id(name).ok_or_else(|| {
                err(format!(
                    "{} names eos_token {name:?}, which is not in the vocabulary",
                    config.display()
                ))
            });
        }
    }
    let specials = tokenizer.get_added_tokens_decoder();
    for want in EOS_CANDIDATES {
        if let Some((&id, _)) = specials
            .iter()
            .filter(|(_, t)| t.special && t.content == *want)
            .min_by_key(|(&id, _)| id)
        {
            return Ok(id);
        }
    }
    Err(err(format!(
        "cannot tell which token is EOS (no tokenizer_config.json with eos_token beside it, \
         and none of the special tokens is one of {EOS_CANDIDATES:?}); pass --eos-id N, \
         --eos-token TOKEN or --no-eos"
    )))
}
