//! From what a config names to shard paths: a prefix, a `.bin`/`.idx` path, a directory or
//! a glob, expanded in the same order on every node, with nothing left out silently (a
//! missing half of a pair, a dangling link and a foreign file in a raw directory are
//! errors naming them).

use std::path::{Path, PathBuf};

use super::{megatron, raw, CorpusError, Format, Result};

/// Expands what a user named into shard paths, sorted within each argument so that the
/// order (and thus every plan built on it) is the same on every node.
///
/// For Megatron, an argument may be a prefix, a `.bin`/`.idx` path, a directory (every
/// prefix in it with both files) or a glob over any of those. For raw files, a file, a
/// directory (every regular file in it that is not a cache or sidecar) or a glob. A path
/// that exists as written (a run directory named `run[1]`) is that path, not a glob.
pub fn resolve(arg: &Path, format: Format) -> Result<Vec<PathBuf>> {
    let text = arg.to_string_lossy();
    // Sets, not lists: a domain of thousands of shards lists each prefix twice (`.idx`
    // and `.bin`), and a linear `contains` made resolving quadratic in shards.
    if text.contains(['*', '?', '[']) && !exists_as_written(arg, format) {
        let paths = glob::glob(&text).map_err(|e| CorpusError::NotFound {
            path: arg.to_path_buf(),
            what: format!("bad glob pattern: {e}"),
        })?;
        let mut out = std::collections::BTreeSet::new();
        for p in paths {
            let p = p.map_err(|e| {
                let path = e.path().to_path_buf();
                CorpusError::io(path, "glob", e.into())
            })?;
            if !p.is_file() && p.is_symlink() {
                check_link(&p, format)?;
            }
            let is_file = |q: &Path| q.is_file();
            if let Some(s) = shard_of(&p, format, &out, is_file)? {
                out.insert(s);
            }
        }
        if out.is_empty() {
            // A path holding `[` that does not exist reads as a glob too: say so.
            let bracket = if text.contains('[') {
                "; `[` is a glob character (`run[1]` matches `run1`, not `run[1]`): to \
                 name a path that holds `[` in a glob, write it as `[[]`"
            } else {
                ""
            };
            return Err(CorpusError::NotFound {
                path: arg.to_path_buf(),
                what: format!("the glob matches no {} shard{bracket}", format.name()),
            });
        }
        return Ok(out.into_iter().collect());
    }
    if arg.is_dir() {
        let entries = std::fs::read_dir(arg).map_err(|e| CorpusError::io(arg, "read_dir", e))?;
        // The listing says which entries are regular files (no stat per file); only a
        // symbolic link is stat'ed, to see what it points to.
        let mut files = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| CorpusError::io(arg, "read_dir", e))?;
            let kind = entry
                .file_type()
                .map_err(|e| CorpusError::io(entry.path(), "stat", e))?;
            let path = entry.path();
            if kind.is_file() || (kind.is_symlink() && path.is_file()) {
                files.insert(path);
            } else if kind.is_symlink() {
                check_link(&path, format)?;
            }
        }
        if format == Format::Raw {
            for p in &files {
                check_raw_name(p, arg)?;
            }
        }
        let mut out = std::collections::BTreeSet::new();
        for p in &files {
            if let Some(s) = shard_of(p, format, &out, |q| files.contains(q))? {
                out.insert(s);
            }
        }
        if out.is_empty() {
            return Err(CorpusError::NotFound {
                path: arg.to_path_buf(),
                what: format!("the directory holds no {} shard", format.name()),
            });
        }
        return Ok(out.into_iter().collect());
    }
    match format {
        Format::Megatron => {
            let prefix = strip_megatron_ext(arg);
            let idx = megatron::with_suffix(&prefix, "idx");
            let bin = megatron::with_suffix(&prefix, "bin");
            // The OS's reason when it is not plain absence (a symlink loop, a directory
            // the user may not search): "no such file" sent them looking for a typo.
            let absent = |p: &Path, what: &str| match std::fs::metadata(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    format!("cannot be read: {e}")
                }
                _ => what.to_string(),
            };
            match (idx.exists(), bin.exists()) {
                (true, true) => Ok(vec![prefix]),
                (false, _) => Err(CorpusError::NotFound {
                    what: absent(
                        &idx,
                        "no such index file (a Megatron shard needs <prefix>.idx and <prefix>.bin)",
                    ),
                    path: idx,
                }),
                (true, false) => Err(CorpusError::NotFound {
                    what: absent(&bin, "no such data file (the .idx has no .bin beside it)"),
                    path: bin,
                }),
            }
        }
        Format::Raw => match std::fs::metadata(arg) {
            Ok(m) if m.is_file() => Ok(vec![arg.to_path_buf()]),
            Ok(m) => Err(not_regular(arg, &m)),
            Err(e) => Err(CorpusError::NotFound {
                path: arg.to_path_buf(),
                what: match e.kind() {
                    std::io::ErrorKind::NotFound => "no such token file".into(),
                    _ => format!("cannot be read: {e}"),
                },
            }),
        },
    }
}

/// Whether `arg` names something that exists as written, glob characters and all: the
/// path itself, or for Megatron a shard file of the prefix it names.
fn exists_as_written(arg: &Path, format: Format) -> bool {
    if arg.exists() {
        return true;
    }
    let prefix = strip_megatron_ext(arg);
    format == Format::Megatron
        && ["idx", "bin"]
            .iter()
            .any(|ext| megatron::with_suffix(&prefix, ext).exists())
}

/// The shard a directory entry or glob match belongs to, if it is not in `found` yet.
/// `is_file` says whether a path is a regular file (a stat, or a lookup in a listing). A
/// `.bin` without its `.idx` (or the reverse) is an error, not something to skip:
/// silently leaving a shard out of a domain would change the mixture without anyone
/// noticing.
fn shard_of(
    p: &Path,
    format: Format,
    found: &std::collections::BTreeSet<PathBuf>,
    is_file: impl Fn(&Path) -> bool,
) -> Result<Option<PathBuf>> {
    let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(None);
    };
    match format {
        Format::Megatron => {
            if !(name.ends_with(".idx") || name.ends_with(".bin")) {
                return Ok(None);
            }
            let prefix = strip_megatron_ext(p);
            // The pair was checked when its other file was seen.
            if found.contains(&prefix) || !is_file(p) {
                return Ok(None);
            }
            let idx = megatron::with_suffix(&prefix, "idx");
            let bin = megatron::with_suffix(&prefix, "bin");
            match (is_file(&idx), is_file(&bin)) {
                (true, true) => Ok(Some(prefix)),
                (false, _) => Err(CorpusError::NotFound {
                    path: idx,
                    what: format!("{name} has no index beside it (an incomplete copy?)"),
                }),
                (true, false) => Err(CorpusError::NotFound {
                    path: bin,
                    what: format!("{name} has no data file beside it (an incomplete copy?)"),
                }),
            }
        }
        Format::Raw => {
            let skip = raw_skipped(&name);
            Ok((!skip && !found.contains(p) && is_file(p)).then(|| p.to_path_buf()))
        }
    }
}

/// Whether a raw domain's directory or glob passes over a file of this name: a group
/// sidecar, a boundary cache, a temporary or hidden file.
fn raw_skipped(name: &str) -> bool {
    name.ends_with(".groups.npy")
        || name.ends_with(&format!(".{}", raw::CACHE_EXT))
        || name.contains(".tmp")
        || name.starts_with('.')
}

/// Whether a file of this name would be a shard of `format` in a directory or glob (a
/// regular file of that name would be read).
fn shard_named(name: &str, format: Format) -> bool {
    match format {
        Format::Megatron => name.ends_with(".idx") || name.ends_with(".bin"),
        Format::Raw => !raw_skipped(name),
    }
}

/// A symbolic link in a directory or among a glob's matches that is neither a regular
/// file nor a directory when followed (dangling, or a device): an error naming it when
/// its name makes it a shard, where it was left out silently (a dangling link of a link
/// farm whose target file system went away took its shard out of the domain and moved
/// the mixture, while naming the shard itself was an error).
fn check_link(link: &Path, format: Format) -> Result<()> {
    let name = link.file_name().map(|n| n.to_string_lossy().into_owned());
    if !name.is_some_and(|n| shard_named(&n, format)) {
        return Ok(());
    }
    match std::fs::metadata(link) {
        // A link to a directory is passed over as a directory is.
        Ok(m) if m.is_file() || m.is_dir() => Ok(()),
        Ok(m) => Err(not_regular(link, &m)),
        Err(e) => Err(CorpusError::NotFound {
            path: link.to_path_buf(),
            what: format!("a symbolic link whose target cannot be read ({e}): a dangling link?"),
        }),
    }
}

/// The extensions a raw token file in a directory may have (none is one of them): what
/// `tofile`, OLMo's memmaps and nanoGPT's `train.bin` write.
const RAW_EXTENSIONS: &[&str] = &[
    "npy", "bin", "u16", "u32", "uint16", "uint32", "tok", "tokens", "dat", "raw",
];

/// A raw domain's directory is read as token files whole: a README, a config or a
/// manifest beside them was read as tokens (its bytes are valid uint16 ids) and trained
/// on. So a file there must have a token file's extension ([`RAW_EXTENSIONS`], or none)
/// or be one the directory passes over; anything else is an error naming it, and a
/// glob picks token files of another name.
fn check_raw_name(p: &Path, dir: &Path) -> Result<()> {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(name) = name.filter(|n| !raw_skipped(n)) else {
        return Ok(());
    };
    let ext = Path::new(&name)
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase());
    match ext {
        None => Ok(()),
        Some(e) if RAW_EXTENSIONS.contains(&e.as_str()) => Ok(()),
        Some(e) => Err(CorpusError::Invalid {
            path: p.to_path_buf(),
            what: format!(
                "is in raw directory {} but its extension .{e} is not a token file's (.{}, \
                 or none): move it out, or name the token files with a glob (e.g. {}/*.npy)",
                dir.display(),
                RAW_EXTENSIONS.join(", ."),
                dir.display()
            ),
        }),
    }
}

/// What kind of file `t` is, as an error message says it ("a directory", "a FIFO"...):
/// shared by the shard opener and the daemon's socket-path check, so a user who points
/// either at the wrong thing is told what is there.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown file type"
    }
}

/// The error for a path that exists but is not a regular file, saying what it is.
pub(super) fn not_regular(path: &Path, meta: &std::fs::Metadata) -> CorpusError {
    let kind = file_kind(&meta.file_type());
    CorpusError::Invalid {
        path: path.to_path_buf(),
        what: format!("is {kind}, not a regular file: a shard must be a regular file"),
    }
}

/// `x.bin` or `x.idx` -> `x`; anything else unchanged.
fn strip_megatron_ext(p: &Path) -> PathBuf {
    match p.extension().and_then(|e| e.to_str()) {
        Some("bin") | Some("idx") => p.with_extension(""),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{DType, MegatronWriter, Shard};

    /// A directory listing answers "is it a regular file" without a stat, except for
    /// links, which are followed: a linked shard resolves, a link to a directory named
    /// like an index is no index.
    #[test]
    fn a_directory_of_links_resolves_like_one_of_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (real, dir) = (tmp.path().join("real"), tmp.path().join("d"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = MegatronWriter::create(&real.join("a"), DType::Uint16).unwrap();
        w.add_document_bytes(&[1, 0, 2, 0]).unwrap();
        w.finish().unwrap();
        for ext in ["idx", "bin"] {
            let name = format!("a.{ext}");
            std::os::unix::fs::symlink(real.join(&name), dir.join(&name)).unwrap();
        }
        std::fs::write(dir.join("b.bin"), b"").unwrap();
        std::fs::create_dir(real.join("b.idx")).unwrap();
        std::os::unix::fs::symlink(real.join("b.idx"), dir.join("b.idx")).unwrap();
        match resolve(&dir, Format::Megatron) {
            Err(CorpusError::NotFound { path, what }) => {
                assert_eq!(path, dir.join("b.idx"));
                assert!(what.contains("no index beside it"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(dir.join("b.bin")).unwrap();
        assert_eq!(
            resolve(&dir, Format::Megatron).unwrap(),
            vec![dir.join("a")]
        );
        Shard::open(&dir.join("a"), None).unwrap();
    }
}
