//! tokenize, Workers: chunk -> tokens, group/order keys and bad lines; the JSON field picker they use.

use super::*;

// ---------------------------------------------------------------------------------------
// Workers: chunk -> tokens, keys and bad lines.

/// One document of a processed chunk.
pub(super) struct Doc {
    /// Tokens, EOS included.
    pub(super) ntok: u64,
    /// Its group key in [`Done::keys`]; `None` when the group field is absent or null.
    pub(super) group: Option<(usize, usize)>,
    /// Its order key in [`Done::keys`].
    pub(super) order: (usize, usize),
}

/// A processed chunk.
pub(super) struct Done {
    pub(super) seq: u64,
    pub(super) file: usize,
    pub(super) stored_end: u64,
    pub(super) lines: u64,
    pub(super) blank: u64,
    pub(super) text_bytes: u64,
    /// The documents' tokens back to back, little-endian in the output dtype.
    pub(super) tokens: Vec<u8>,
    pub(super) docs: Vec<Doc>,
    pub(super) keys: Vec<u8>,
    /// Group keys (in `keys`) of rows dropped as bad after their group was read.
    pub(super) dropped: Vec<(usize, usize)>,
    pub(super) bad: Vec<(u64, BadKind, String)>,
    /// Documents that belong to other runs of the job, skipped before tokenizing.
    pub(super) elsewhere: u64,
    pub(super) fatal: Option<TokenizeError>,
    /// Scratch for one document's ids, reused across the chunk.
    pub(super) ids: Vec<u32>,
}

impl Done {
    /// Nothing done yet for chunk `seq` of input `file`, with room for `bytes` of text.
    pub(super) fn new(seq: u64, file: usize, stored_end: u64, bytes: usize) -> Done {
        Done {
            seq,
            file,
            stored_end,
            lines: 0,
            blank: 0,
            text_bytes: 0,
            tokens: Vec::with_capacity(bytes / 2),
            docs: Vec::new(),
            keys: Vec::new(),
            dropped: Vec::new(),
            bad: Vec::new(),
            elsewhere: 0,
            fatal: None,
            ids: Vec::new(),
        }
    }
}

/// A worker's own copy of everything it needs.
pub(super) struct Worker {
    pub(super) tokenizer: Tokenizer,
    pub(super) eos: Option<u32>,
    pub(super) dtype: DType,
    pub(super) max: u64,
    pub(super) text_field: String,
    pub(super) group_field: Option<String>,
    pub(super) order_field: Option<String>,
    pub(super) grouped: bool,
    pub(super) max_line: u64,
    pub(super) gate: Arc<EncodeGate>,
    /// This run's share of a grouped job of several runs.
    pub(super) share: Option<Share>,
}

impl Worker {
    pub(super) fn run(&self, work: &Mutex<Receiver<Chunk>>, done: &SyncSender<Done>) {
        loop {
            let chunk = {
                let Ok(rx) = work.lock() else { return };
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            // A panic here (inside the tokenizers library, say) would end this thread
            // with its chunk never done: the writer would wait for it for ever and the
            // run would hang. It becomes the run's error instead.
            let (seq, file, stored_end, first) =
                (chunk.seq, chunk.file, chunk.stored_end, chunk.first_line);
            let processed = std::panic::catch_unwind(AssertUnwindSafe(|| self.process(chunk)));
            let d = processed.unwrap_or_else(|panic| {
                let mut d = Done::new(seq, file, stored_end, 0);
                d.fatal = Some(TokenizeError::Input {
                    path: PathBuf::new(), // filled in by the writer
                    what: format!(
                        "tokenizing the lines from line {first} panicked: {}",
                        panic_message(panic.as_ref())
                    ),
                });
                d
            });
            if done.send(d).is_err() {
                return;
            }
        }
    }

    pub(super) fn process(&self, chunk: Chunk) -> Done {
        let mut d = Done::new(chunk.seq, chunk.file, chunk.stored_end, chunk.data.len());
        d.text_bytes = chunk.data.len() as u64 + chunk.skipped_bytes;
        let data = &chunk.data[..];
        let mut skipped = chunk.skipped.iter().peekable();
        // A UTF-8 byte-order mark opening a file is not part of its first line.
        let opens_file = chunk.first_line == 1 && skipped.peek().is_none_or(|s| s.0 > 0);
        let mut start = if opens_file && data.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        loop {
            let line_no = chunk.first_line + d.lines;
            // Lines the reader left out come back in their place, so bad lines are
            // reported in input order.
            if let Some(&(_, len)) = skipped.next_if(|s| s.0 == d.lines || start >= data.len()) {
                d.lines += 1;
                d.bad.push((
                    line_no,
                    BadKind::LineTooLong,
                    format!(
                        "{len} bytes, more than --max-line-bytes {}; skipped unread",
                        self.max_line
                    ),
                ));
                continue;
            }
            if start >= data.len() {
                break;
            }
            let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
            d.lines += 1;
            if let Err(fatal) = self.line(&data[start..end], line_no, &mut d) {
                d.fatal = Some(fatal);
                return d;
            }
            start = end + 1;
        }
        d
    }

    /// Handles one line: a document, a blank, or a bad line. Errs only on what must stop
    /// the run (a token id the dtype cannot hold).
    pub(super) fn line(&self, bytes: &[u8], line_no: u64, d: &mut Done) -> Result<()> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            d.blank += 1;
            return Ok(());
        }
        let mut bad = |kind: BadKind, what: String| d.bad.push((line_no, kind, what));
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                bad(
                    BadKind::NonUtf8,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                );
                return Ok(());
            }
        };
        let pick = Pick {
            text: &self.text_field,
            group: self.group_field.as_deref(),
            order: self.order_field.as_deref(),
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let picked = match pick.deserialize(&mut de).and_then(|p| de.end().map(|()| p)) {
            Ok(p) => p,
            Err(e) => {
                bad(BadKind::InvalidJson, e.to_string());
                return Ok(());
            }
        };
        let body = match picked.text {
            Val::Str(s) if s.is_empty() => Err((
                BadKind::EmptyText,
                format!("field {:?} is an empty string", self.text_field),
            )),
            Val::Str(s) => Ok(s),
            Val::Absent => Err((
                BadKind::MissingField,
                format!("no field {:?}", self.text_field),
            )),
            Val::Null => Err((
                BadKind::MissingField,
                format!("field {:?} is null", self.text_field),
            )),
            other => Err((
                BadKind::WrongType,
                format!(
                    "field {:?} is {}; expected a string",
                    self.text_field,
                    other.describe()
                ),
            )),
        };
        let body = match body {
            Ok(b) => b,
            Err((kind, what)) => {
                bad(kind, what);
                if self.grouped {
                    // The row's group still counts as seen, so that a group left with
                    // no rows at all is reported rather than silently gone.
                    let at = d.keys.len();
                    match push_key(&mut d.keys, &picked.group) {
                        Ok(true) => d.dropped.push((at, d.keys.len() - at)),
                        _ => d.keys.truncate(at),
                    }
                }
                return Ok(());
            }
        };
        let keys_at = d.keys.len();
        let mut group = None;
        let mut order = (d.keys.len(), 0);
        if self.grouped {
            let field = self.group_field.as_deref().unwrap_or_default();
            match push_key(&mut d.keys, &picked.group) {
                Ok(true) => group = Some((keys_at, d.keys.len() - keys_at)),
                Ok(false) => {}
                Err(what) => {
                    bad(BadKind::WrongType, format!("field {field:?} is {what}"));
                    return Ok(());
                }
            }
            let at = d.keys.len();
            let field = self.order_field.as_deref().unwrap_or_default();
            match push_key(&mut d.keys, &picked.order) {
                Ok(true) => {}
                Ok(false) => d.keys.push(0),
                Err(what) => {
                    drop_keys(d, keys_at, group);
                    let what = format!("field {field:?} is {what}");
                    d.bad.push((line_no, BadKind::WrongType, what));
                    return Ok(());
                }
            }
            order = (at, d.keys.len() - at);
            if let Some(share) = self.share {
                let mine = match group {
                    Some((a, n)) => share.owns_group(&d.keys[a..a + n]),
                    None => share.owns_line(d.file, line_no),
                };
                if !mine {
                    d.keys.truncate(keys_at);
                    d.elsewhere += 1;
                    return Ok(());
                }
            }
        }
        let mut ids = std::mem::take(&mut d.ids);
        ids.clear();
        let permit = (body.len() >= GATED_LINE_BYTES).then(|| self.gate.enter(body.len() as u64));
        // The tokenizers library panics on some inputs to a malformed tokenizer (an
        // unreadable Precompiled normalizer indexes out of bounds): a bad line.
        let encoded = catch_quietly(|| encode_ids(&self.tokenizer, body.as_ref(), &mut ids))
            .unwrap_or_else(|panic| {
                let what = panic_message(panic.as_ref());
                Err(format!("the tokenizer panicked on it: {what}").into())
            });
        drop(permit);
        if let Err(e) = encoded {
            d.ids = ids;
            drop_keys(d, keys_at, group);
            d.bad.push((line_no, BadKind::EncodeFailed, e.to_string()));
            return Ok(());
        }
        let result = self.push_doc(d, &ids, line_no, keys_at, group, order);
        d.ids = ids;
        result
    }

    /// Appends one document's tokens (and EOS) to the chunk's output.
    pub(super) fn push_doc(
        &self,
        d: &mut Done,
        ids: &[u32],
        line_no: u64,
        keys_at: usize,
        group: Option<(usize, usize)>,
        order: (usize, usize),
    ) -> Result<()> {
        let ntok = ids.len() as u64 + u64::from(self.eos.is_some());
        if ntok > i32::MAX as u64 {
            drop_keys(d, keys_at, group);
            d.bad.push((
                line_no,
                BadKind::TooLong,
                format!(
                    "{ntok} tokens; a Megatron sequence holds at most {}",
                    i32::MAX
                ),
            ));
            return Ok(());
        }
        let before = d.tokens.len();
        let pushed = push_ids(&mut d.tokens, self.dtype, self.max, ids)
            .and_then(|()| push_ids(&mut d.tokens, self.dtype, self.max, self.eos.as_slice()));
        if let Err(id) = pushed {
            d.tokens.truncate(before);
            // The path is filled in by the writer, which knows the file names.
            return Err(TokenizeError::TokenRange {
                path: PathBuf::new(),
                line: line_no,
                id,
                dtype: self.dtype,
            });
        }
        d.docs.push(Doc { ntok, group, order });
        Ok(())
    }
}

/// Forgets a dropped row's keys but keeps its group key, noted in [`Done::dropped`].
pub(super) fn drop_keys(d: &mut Done, keys_at: usize, group: Option<(usize, usize)>) {
    match group {
        Some((at, n)) => {
            d.keys.truncate(at + n);
            d.dropped.push((at, n));
        }
        None => d.keys.truncate(keys_at),
    }
}

/// Bounds the text being encoded at once in large documents: the tokenizer needs ~130
/// bytes per byte of a document, so `--threads` documents of `--max-line-bytes` each
/// together could exhaust the machine. A document enters once the others inside leave
/// room in the budget; one alone always enters, so nothing waits forever.
pub(super) struct EncodeGate {
    pub(super) budget: u64,
    pub(super) inside: Mutex<u64>,
    pub(super) left: Condvar,
}

/// A document's place in the [`EncodeGate`], given back when dropped.
pub(super) struct Permit<'g> {
    pub(super) gate: &'g EncodeGate,
    pub(super) bytes: u64,
}

impl EncodeGate {
    pub(super) fn new(budget: u64) -> EncodeGate {
        EncodeGate {
            budget,
            inside: Mutex::new(0),
            left: Condvar::new(),
        }
    }

    /// Waits until `bytes` more fit the budget (or nothing else is inside).
    pub(super) fn enter(&self, bytes: u64) -> Permit<'_> {
        // A poisoned lock only means another worker panicked; the count is still right.
        let mut inside = self.inside.lock().unwrap_or_else(PoisonError::into_inner);
        while *inside > 0 && *inside + bytes > self.budget {
            inside = self
                .left
                .wait(inside)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *inside += bytes;
        Permit { gate: self, bytes }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut inside = self
            .gate
            .inside
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *inside -= self.bytes;
        self.gate.left.notify_all();
    }
}

/// The ids `tokenizer.encode_fast(text, false)` gives, without building an `Encoding`
/// (its per-token strings, offsets and masks cost about a fifth of the time): the same
/// steps (added tokens, normalizer, pre-tokenizer, model) in the same order. Without
/// special tokens, no post-processor adds or changes ids, so none runs here; the tests
/// check this against `encode_fast`.
pub fn encode_ids(tokenizer: &Tokenizer, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
    let mut pre = tokenizer
        .get_added_vocabulary()
        .extract_and_normalize(tokenizer.get_normalizer(), text);
    if let Some(pt) = tokenizer.get_pre_tokenizer() {
        pt.pre_tokenize(&mut pre)?;
    }
    let model = tokenizer.get_model();
    pre.tokenize(|n| model.tokenize(n.get()))?;
    for (_, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
        if let Some(tokens) = tokens {
            out.extend(tokens.iter().map(|t| t.id));
        }
    }
    Ok(())
}

/// Appends `ids` in `dtype`, little-endian; `Err(id)` for an id above `max`.
pub(super) fn push_ids(
    out: &mut Vec<u8>,
    dtype: DType,
    max: u64,
    ids: &[u32],
) -> std::result::Result<(), u32> {
    if let Some(&bad) = ids.iter().find(|&&id| u64::from(id) > max) {
        return Err(bad);
    }
    match dtype.size() {
        1 => out.extend(ids.iter().map(|&id| id as u8)),
        2 => {
            out.reserve(ids.len() * 2);
            for &id in ids {
                out.extend_from_slice(&(id as u16).to_le_bytes());
            }
        }
        4 => {
            out.reserve(ids.len() * 4);
            for &id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        _ => {
            out.reserve(ids.len() * 8);
            for &id in ids {
                out.extend_from_slice(&u64::from(id).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Appends the sort key of a group or order value: bytes whose order is the values' order
/// (numbers numerically, before strings, which compare bytewise). `Ok(false)` for an
/// absent or null value (nothing appended), `Err` naming the type of an unusable one.
pub(super) fn push_key(out: &mut Vec<u8>, v: &Val<'_>) -> std::result::Result<bool, String> {
    match v {
        Val::Absent | Val::Null => Ok(false),
        Val::Str(s) => {
            out.push(2);
            out.extend_from_slice(s.as_bytes());
            Ok(true)
        }
        Val::Int(i) => {
            out.push(1);
            out.extend_from_slice(&f64_key(*i as f64));
            out.extend_from_slice(&((*i as u128) ^ (1 << 127)).to_be_bytes());
            Ok(true)
        }
        // JSON reads an integer past 64 bits as the nearest double: distinct ids (of
        // 30 digits, say) would become one group. Only a string keeps them apart.
        Val::Float(f) if *f >= 2f64.powi(64) || *f <= -(2f64.powi(63)) => Err(
            "a number beyond 64-bit integers, which reads as the nearest double (distinct \
             values would merge); write it as a string"
                .into(),
        ),
        Val::Float(f) => {
            out.push(1);
            out.extend_from_slice(&f64_key(*f));
            out.extend_from_slice(&((*f as i128 as u128) ^ (1 << 127)).to_be_bytes());
            Ok(true)
        }
        Val::Other(what) => Err(format!("{what}; expected a string or a number")),
    }
}

/// Big-endian bytes of `f` that sort as `f` does (IEEE total order).
pub(super) fn f64_key(f: f64) -> [u8; 8] {
    let bits = f.to_bits();
    let key = if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    };
    key.to_be_bytes()
}

// ---------------------------------------------------------------------------------------
// JSON: pull three fields out of an object without building it.

/// The fields to pull out of each line.
pub(super) struct Pick<'f> {
    pub(super) text: &'f str,
    pub(super) group: Option<&'f str>,
    pub(super) order: Option<&'f str>,
}

/// The fields pulled out of one line.
pub(super) struct Picked<'a> {
    pub(super) text: Val<'a>,
    pub(super) group: Val<'a>,
    pub(super) order: Val<'a>,
}

/// A field's value, borrowed from the line when it has no escapes.
pub(super) enum Val<'a> {
    Absent,
    Null,
    Str(Cow<'a, str>),
    Int(i128),
    Float(f64),
    Other(&'static str),
}

impl Val<'_> {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Val::Absent => "absent",
            Val::Null => "null",
            Val::Str(_) => "a string",
            Val::Int(_) | Val::Float(_) => "a number",
            Val::Other(what) => what,
        }
    }
}

impl<'de> Deserialize<'de> for Val<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ValVisitor)
    }
}

pub(super) struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Int(i128::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Int(i128::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Float(v))
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Other("a boolean"))
    }
    fn visit_unit<E>(self) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Val<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Val::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Val<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Other("an object"))
    }
}

/// An object key, borrowed when it has no escapes.
pub(super) struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Picked<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Picked<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Picked<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Picked<'de>, A::Error> {
        let mut out = Picked {
            text: Val::Absent,
            group: Val::Absent,
            order: Val::Absent,
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let key = key.as_ref();
            if key == self.text {
                out.text = map.next_value()?;
            } else if Some(key) == self.group {
                out.group = map.next_value()?;
            } else if Some(key) == self.order {
                out.order = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numbers_numerically_then_strings() {
        let key = |v: Val<'_>| {
            let mut k = Vec::new();
            push_key(&mut k, &v).unwrap();
            k
        };
        let mut ks = [
            key(Val::Str("a".into())),
            key(Val::Int(10)),
            key(Val::Float(2.5)),
            key(Val::Int(-3)),
            key(Val::Int(2)),
            key(Val::Str("B".into())),
        ];
        ks.sort();
        let want = [
            key(Val::Int(-3)),
            key(Val::Int(2)),
            key(Val::Float(2.5)),
            key(Val::Int(10)),
            key(Val::Str("B".into())),
            key(Val::Str("a".into())),
        ];
        assert_eq!(ks, want);
        // Integers beyond f64's precision still order exactly.
        assert!(key(Val::Int((1 << 60) + 1)) > key(Val::Int(1 << 60)));
    }

    #[test]
    fn the_encode_gate_admits_up_to_its_budget_and_one_alone_always() {
        let gate = Arc::new(EncodeGate::new(10));
        let big = gate.enter(25); // over budget, but alone: admitted
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _p = gate.enter(4);
                let _ = tx.send(());
            })
        };
        // It waits while the big one is inside...
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(big);
        // ...and enters once it has left.
        assert!(rx.recv_timeout(Duration::from_secs(30)).is_ok());
        waiter.join().unwrap();
        let a = gate.enter(6);
        let b = gate.enter(4); // 6 + 4 fits exactly
        drop((a, b));
        assert_eq!(*gate.inside.lock().unwrap(), 0);
    }
}
