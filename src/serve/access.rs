//! Who may use the daemon's unix socket (`[serve] socket_group`, `allowed_uids`,
//! `allowed_gids`).
//!
//! Two gates, both checked by the kernel or the daemon before a single frame is read:
//!
//! 1. The file: the socket is created mode 0660 and, with `socket_group` set, chowned to
//!    that group ([`secure_socket`], which never follows a symlink), so only its owner and the group's members can
//!    open it at all.
//! 2. The peer: every accepted connection's SO_PEERCRED (uid, primary gid) is checked
//!    against a [`Policy`]. With neither `allowed_uids` nor `allowed_gids` set, whoever
//!    passed the file gate is allowed; otherwise only listed uids, uids whose primary gid
//!    is listed, and the daemon's own uid are. A refused client gets a REFUSED frame with
//!    code `access` and the [`Policy::authorized`] message, trainers and control clients
//!    alike.
//!
//! [`resolve_group`] is the lookup alone, for `millrace check-config`.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Why the socket's group could not be resolved or set; every variant names the
/// `[serve] socket_group` value (and the socket, for chown), so the operator knows which
/// setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The group name is not in the group database (nor a number).
    #[error("[serve] socket_group {group:?}: no such group")]
    NoSuchGroup {
        /// The configured group.
        group: String,
    },
    /// The group name cannot be a C string (empty or holding a NUL byte).
    #[error("[serve] socket_group {group:?}: not a valid group name ({why})")]
    BadName {
        /// The configured group.
        group: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The group database could not be read (NSS failure, out of memory).
    #[error("[serve] socket_group {group:?}: looking the group up failed: {source}")]
    Lookup {
        /// The configured group.
        group: String,
        /// The error getgrnam_r returned.
        source: std::io::Error,
    },
    /// The socket file's mode could not be set.
    #[error("chmod 0660 {}: {source}", path.display())]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// What is at the socket path after bind is not the socket bound there (someone
    /// swapped it, e.g. for a symlink): nothing is chmodded or chowned.
    #[error(
        "{}: is {what}, not the socket the daemon bound (was it replaced? the socket's \
         directory must not be writable by others); nothing was chmodded or chowned",
        path.display()
    )]
    Replaced {
        /// The socket path.
        path: PathBuf,
        /// What is there instead.
        what: String,
    },
    /// The socket file could not be given to the group (not a member, not root).
    #[error("chown {} to group {group} (gid {gid}): {source}", path.display())]
    Chown {
        /// The socket path.
        path: PathBuf,
        /// The configured group.
        group: String,
        /// The gid it resolved to.
        gid: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something appeared at the socket path while the daemon bound and secured its
    /// socket under its staging name: another daemon started on the same socket.
    #[error(
        "{}: another daemon bound this socket while this one started; stop it or choose \
         another [serve] socket",
        path.display()
    )]
    Taken {
        /// The socket path.
        path: PathBuf,
    },
    /// The staging name ([`staging_path`]) holds something the daemon may not remove.
    #[error("{}: the daemon binds its socket here before linking it into place, and it {what}", path.display())]
    Staging {
        /// The staging path.
        path: PathBuf,
        /// What is wrong with what is there.
        what: String,
    },
    /// The socket secured under its staging name could not be linked to its path (a
    /// filesystem without hard links for sockets, or no /proc).
    #[error("{}: linking the socket bound as {} there: {source}", path.display(), staged.display())]
    Link {
        /// The socket path.
        path: PathBuf,
        /// Where it was bound.
        staged: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which peers may talk to the daemon once they have opened its socket; built from
/// `[serve] allowed_uids` / `allowed_gids` and checked on every accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `[serve] allowed_uids`; `None` when the key is absent.
    pub uids: Option<Vec<u32>>,
    /// `[serve] allowed_gids` (matched against the peer's primary gid); `None` when absent.
    pub gids: Option<Vec<u32>>,
    /// `[serve] control_uids`: who besides the daemon's uid and root may change the plan
    /// over a control connection; `None` (the key absent): every peer that passes.
    pub control: Option<Vec<u32>>,
    /// The daemon's effective uid: always allowed, so its operator can never lock
    /// themselves out of `millrace ctl`.
    pub daemon_uid: u32,
}

impl Policy {
    /// The policy for these config lists, with the daemon's own effective uid allowed.
    pub fn new(uids: Option<Vec<u32>>, gids: Option<Vec<u32>>) -> Policy {
        let daemon_uid = crate::sys::euid();
        Policy {
            uids,
            gids,
            control: None,
            daemon_uid,
        }
    }

    /// This policy with `[serve] control_uids`.
    pub fn with_control(self, control: Option<Vec<u32>>) -> Policy {
        Policy { control, ..self }
    }

    /// Whether a peer of this uid (`None`: its credentials could not be read) may change
    /// the plan (`set_weights`, `set_stage`, `reload`): one in `control_uids`, the
    /// daemon's own or root; reading `status` and the journal needs only
    /// [`Policy::authorized`]. The error is the control reply's message.
    pub fn may_change(&self, uid: Option<u32>) -> Result<(), Denied> {
        let Some(list) = &self.control else {
            return Ok(());
        };
        match uid {
            // Root may restart the daemon or edit its config anyway.
            Some(u) if u == self.daemon_uid || u == 0 || list.contains(&u) => Ok(()),
            Some(uid) => Err(Denied::NotControl {
                uid,
                uids: list.clone(),
                daemon_uid: self.daemon_uid,
            }),
            None => Err(Denied::NoCredentials),
        }
    }

    /// True when neither list is set: the socket file's mode and group are the only gate.
    pub fn open(&self) -> bool {
        self.uids.is_none() && self.gids.is_none()
    }

    /// Whether a peer with this uid and primary gid (from SO_PEERCRED) may proceed;
    /// the error is the REFUSED message, naming the peer and the settings to extend.
    pub fn authorized(&self, uid: u32, gid: u32) -> Result<(), Denied> {
        if self.open() || uid == self.daemon_uid {
            return Ok(());
        }
        let listed =
            |list: &Option<Vec<u32>>, id: u32| list.as_ref().is_some_and(|l| l.contains(&id));
        if listed(&self.uids, uid) || listed(&self.gids, gid) {
            return Ok(());
        }
        Err(Denied::NotListed {
            uid,
            gid,
            uids: self.uids.clone().unwrap_or_default(),
            gids: self.gids.clone().unwrap_or_default(),
            daemon_uid: self.daemon_uid,
        })
    }
}

/// Why a peer may not use the socket: the REFUSED message, naming the peer and the
/// settings to extend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Neither its uid nor its primary gid is listed.
    #[error(
        "uid {uid} (gid {gid}) is not in [serve] allowed_uids {uids:?} or allowed_gids \
         {gids:?}; the daemon's own uid {daemon_uid} is always allowed"
    )]
    NotListed {
        /// The peer's uid.
        uid: u32,
        /// The peer's primary gid.
        gid: u32,
        /// `[serve] allowed_uids`.
        uids: Vec<u32>,
        /// `[serve] allowed_gids`.
        gids: Vec<u32>,
        /// The daemon's own uid, always allowed.
        daemon_uid: u32,
    },
    /// It may connect, but its uid is not one that may change the plan.
    #[error(
        "uid {uid} may read status and the journal but not change the plan: it is not in \
         [serve] control_uids {uids:?}; the daemon's own uid {daemon_uid} and root always may"
    )]
    NotControl {
        /// The peer's uid.
        uid: u32,
        /// `[serve] control_uids`.
        uids: Vec<u32>,
        /// The daemon's own uid, always allowed.
        daemon_uid: u32,
    },
    /// SO_PEERCRED failed, so the peer cannot be checked against the lists.
    #[error("the peer's credentials (SO_PEERCRED) could not be read")]
    NoCredentials,
}

/// Resolves `[serve] socket_group` (a group name, or a gid written as digits) to a gid,
/// without touching any file: `millrace check-config` validates with it.
pub fn resolve_group(group: &str) -> Result<u32, AccessError> {
    if !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()) {
        return group.parse::<u32>().map_err(|_| AccessError::BadName {
            group: group.to_string(),
            why: "the gid does not fit in 32 bits",
        });
    }
    if group.is_empty() {
        return Err(AccessError::BadName {
            group: String::new(),
            why: "empty",
        });
    }
    let name = CString::new(group).map_err(|_| AccessError::BadName {
        group: group.to_string(),
        why: "contains a NUL byte",
    })?;
    match crate::sys::group_by_name(&name) {
        Ok(Some(g)) => Ok(g.gid),
        // glibc reports "not found" with these too, depending on the NSS backend.
        Ok(None) => Err(AccessError::NoSuchGroup {
            group: group.to_string(),
        }),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM)
            ) =>
        {
            Err(AccessError::NoSuchGroup {
                group: group.to_string(),
            })
        }
        Err(source) => Err(AccessError::Lookup {
            group: group.to_string(),
            source,
        }),
    }
}

/// Gives the socket just bound at `path` mode 0660 and, with `group`, that group (owner
/// unchanged), without following a symlink: the socket's directory may be writable by
/// others, and one who swapped the socket for a symlink between bind and chmod had the
/// daemon chmod and chown the symlink's target. The path is opened `O_PATH|O_NOFOLLOW`,
/// must be a socket of the daemon's uid (nobody else can make one of ours), and the
/// mode and group are set on that inode (`/proc/self/fd`, `AT_EMPTY_PATH`); anything
/// else there is refused with the path named. Returns the gid the group resolved to.
pub fn secure_socket(path: &Path, group: Option<&str>) -> Result<Option<u32>, AccessError> {
    secure(path, group).map(|(_, gid)| gid)
}

/// [`secure_socket`] of the socket just bound at `staged`, then a link of that very
/// inode (by its descriptor, never by name) to `path`, and `staged` removed. Clients find
/// the socket at `path` only once its mode and group are set: bound in place, it stood
/// for a moment with the umask's mode and the daemon's group, and a client of another
/// uid that connected then got EACCES. A link never replaces what is at `path`
/// ([`AccessError::Taken`]). On an error `staged` is left to the caller.
pub fn place_socket(
    staged: &Path,
    path: &Path,
    group: Option<&str>,
) -> Result<Option<u32>, AccessError> {
    use std::os::fd::AsRawFd;
    let (fd, gid) = secure(staged, group)?;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let cwd = rustix::fs::CWD;
    match rustix::fs::linkat(
        cwd,
        proc.as_str(),
        cwd,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    ) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            return Err(AccessError::Taken {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(AccessError::Link {
                path: path.to_path_buf(),
                staged: staged.to_path_buf(),
                source: e.into(),
            })
        }
    }
    // The name `staged` may be removed by name: the inode is at `path` now whatever it
    // names (a directory writable by others lets them swap names, not our inode).
    let _ = std::fs::remove_file(staged);
    Ok(gid)
}

/// The longest socket path `bind` takes: `sun_path` is 108 bytes with its NUL.
pub const SOCKET_PATH_MAX: usize = 107;

/// Where the socket is bound before [`place_socket`] links it to `path`: a hidden name
/// of this socket and process in the same directory (a link does not cross
/// filesystems), so that two daemons started at once on one path bind apart and the
/// second's link finds the first's socket. `None` when that name would pass the 107
/// bytes a socket path may have; the socket is then bound in place.
pub fn staging_path(path: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name()?);
    name.push(format!(".{:x}", std::process::id()));
    let staged = path.with_file_name(name);
    (staged.as_os_str().as_bytes().len() <= SOCKET_PATH_MAX).then_some(staged)
}

/// Clears the staging name before the bind: a socket of this uid there was left by a
/// start killed between its bind and its link (under the same pid) and is removed;
/// nothing there is fine; anything else is refused ([`AccessError::Staging`]).
pub fn remove_own_socket(staged: &Path) -> Result<(), AccessError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let refuse = |what: String| AccessError::Staging {
        path: staged.to_path_buf(),
        what,
    };
    match std::fs::symlink_metadata(staged) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(refuse(format!("cannot be inspected ({e})"))),
        Ok(m) if m.file_type().is_socket() && m.uid() == crate::sys::euid() => {
            std::fs::remove_file(staged).map_err(|e| {
                refuse(format!(
                    "is a socket an earlier start left that cannot be removed ({e})"
                ))
            })
        }
        Ok(m) => Err(refuse(format!(
            "is {} of uid {}; refusing to remove it",
            crate::corpus::file_kind(&m.file_type()),
            m.uid()
        ))),
    }
}

/// The checks, chmod and chown of [`secure_socket`], returning the socket's `O_PATH`
/// descriptor with the gid.
fn secure(
    path: &Path,
    group: Option<&str>,
) -> Result<(rustix::fd::OwnedFd, Option<u32>), AccessError> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let gid = group.map(resolve_group).transpose()?;
    let os = |source: rustix::io::Errno| std::io::Error::from(source);
    let replaced = |what: String| AccessError::Replaced {
        path: path.to_path_buf(),
        what,
    };
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => replaced("a symlink".into()),
        e => AccessError::Chmod {
            path: path.to_path_buf(),
            source: os(e),
        },
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| AccessError::Chmod {
        path: path.to_path_buf(),
        source: os(e),
    })?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let euid = crate::sys::euid();
    if kind == FileType::Symlink {
        return Err(replaced("a symlink".into()));
    }
    if kind != FileType::Socket || st.st_uid != euid {
        return Err(replaced(format!(
            "a {kind:?} of uid {}, not a socket of the daemon's uid {euid}",
            st.st_uid
        )));
    }
    use std::os::fd::AsRawFd;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(0o660)).map_err(|e| {
        AccessError::Chmod {
            path: path.to_path_buf(),
            source: os(e),
        }
    })?;
    if let (Some(g), Some(gid)) = (group, gid) {
        let to = Some(rustix::fs::Gid::from_raw(gid));
        rustix::fs::chownat(&fd, "", None, to, AtFlags::EMPTY_PATH).map_err(|e| {
            AccessError::Chown {
                path: path.to_path_buf(),
                group: g.to_string(),
                gid,
                source: os(e),
            }
        })?;
    }
    Ok((fd, gid))
}

/// The name of the group with this gid, if the group database has one; for messages.
pub fn group_name(gid: u32) -> Option<String> {
    crate::sys::group_by_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(uids: Option<Vec<u32>>, gids: Option<Vec<u32>>) -> Policy {
        Policy {
            uids,
            gids,
            control: None,
            daemon_uid: 1000,
        }
    }

    #[test]
    fn an_open_policy_lets_everyone_in() {
        let p = policy(None, None);
        assert!(p.open());
        assert_eq!(p.authorized(65534, 65534), Ok(()));
        assert_eq!(p.authorized(0, 0), Ok(()));
        // Any list set, even an empty one, closes it.
        assert!(!policy(Some(vec![]), None).open());
        assert!(!policy(None, Some(vec![])).open());
    }

    #[test]
    fn listed_uids_and_primary_gids_are_allowed() {
        let p = policy(Some(vec![4242, 7]), None);
        assert_eq!(p.authorized(4242, 100), Ok(()));
        assert_eq!(p.authorized(7, 7), Ok(()));
        assert!(p.authorized(8, 4242).is_err(), "a gid is not a uid");
        let p = policy(None, Some(vec![1001]));
        assert_eq!(p.authorized(5000, 1001), Ok(()));
        assert!(p.authorized(1001, 5000).is_err(), "a uid is not a gid");
        let p = policy(Some(vec![1]), Some(vec![2]));
        assert_eq!(p.authorized(1, 9), Ok(()));
        assert_eq!(p.authorized(9, 2), Ok(()));
        assert!(p.authorized(9, 9).is_err());
    }

    #[test]
    fn the_daemon_uid_is_always_allowed() {
        let p = policy(Some(vec![]), Some(vec![]));
        assert_eq!(p.authorized(1000, 12345), Ok(()));
        assert!(p.authorized(1001, 1000).is_err());
        let p = Policy::new(Some(vec![4242]), None);
        let me = crate::sys::euid();
        assert_eq!(p.daemon_uid, me);
        assert_eq!(p.authorized(me, 4_000_000), Ok(()));
    }

    #[test]
    fn a_refusal_names_the_peer_and_the_settings() {
        let p = Policy {
            uids: Some(vec![4242]),
            gids: None,
            control: None,
            daemon_uid: 0,
        };
        let e = p.authorized(65534, 65534).unwrap_err().to_string();
        assert_eq!(
            e,
            "uid 65534 (gid 65534) is not in [serve] allowed_uids [4242] or allowed_gids []; \
             the daemon's own uid 0 is always allowed"
        );
        let e = policy(None, Some(vec![10, 20]))
            .authorized(3, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 3 (gid 4)"), "{e}");
        assert!(e.contains("allowed_uids []"), "{e}");
        assert!(e.contains("allowed_gids [10, 20]"), "{e}");
        assert!(e.contains("uid 1000 is always allowed"), "{e}");
    }

    #[test]
    fn only_listed_uids_and_the_daemons_change_the_plan() {
        let open = policy(None, None);
        assert_eq!(
            open.may_change(Some(65534)),
            Ok(()),
            "unset: every peer may"
        );
        assert_eq!(open.may_change(None), Ok(()));
        let p = policy(None, None).with_control(Some(vec![4242]));
        assert_eq!(p.may_change(Some(4242)), Ok(()));
        assert_eq!(p.may_change(Some(1000)), Ok(()), "the daemon's own uid");
        assert_eq!(p.may_change(None), Err(Denied::NoCredentials));
        assert_eq!(
            p.may_change(Some(65534)).unwrap_err().to_string(),
            "uid 65534 may read status and the journal but not change the plan: it is not \
             in [serve] control_uids [4242]; the daemon's own uid 1000 and root always may"
        );
        assert_eq!(p.may_change(Some(0)), Ok(()), "root");
        // An empty list leaves the daemon's uid alone; connecting is not changed by it.
        let p = policy(None, None).with_control(Some(vec![]));
        assert!(p.may_change(Some(4242)).is_err());
        assert_eq!(p.may_change(Some(1000)), Ok(()));
        assert_eq!(p.authorized(4242, 4242), Ok(()));
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("4294967295").unwrap(), u32::MAX);
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn bad_groups_are_named() {
        let e = resolve_group("millrace-no-such-group").unwrap_err();
        assert!(matches!(e, AccessError::NoSuchGroup { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "[serve] socket_group \"millrace-no-such-group\": no such group"
        );
        for g in ["", "a\0b", "99999999999"] {
            let e = resolve_group(g).unwrap_err();
            assert!(matches!(e, AccessError::BadName { .. }), "{g:?}: {e}");
            assert!(e.to_string().contains("[serve] socket_group"), "{e}");
        }
    }

    /// The socket is bound under its staging name and appears at its path already mode
    /// 0660 and of its group, the very inode bound (a connect reaches the listener), and
    /// the staging name is gone. Bound in place, it stood at its path with the umask's
    /// mode until the chmod, and a client of another uid that connected then got EACCES.
    /// Something already at the path is never replaced.
    #[test]
    fn a_socket_appears_at_its_path_already_secured() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (staged, path) = (dir.path().join(".s.sock.1"), dir.path().join("s.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&staged).unwrap();
        let mine = crate::sys::egid();
        let gid = place_socket(&staged, &path, Some(&mine.to_string())).unwrap();
        assert_eq!(gid, Some(mine));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(
            (meta.mode() & 0o777, meta.gid(), meta.nlink()),
            (0o660, mine, 1)
        );
        assert!(!staged.exists(), "the staging name was removed");
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_ok(),
            "the path leads to the bound socket"
        );

        // A second daemon's socket, placed where the first one is: refused, named, and
        // the first one's socket untouched.
        let other = dir.path().join(".s.sock.2");
        let _second = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let e = place_socket(&other, &path, None).unwrap_err();
        assert!(matches!(e, AccessError::Taken { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{}: another daemon", path.display())));
        let _again = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok(), "the first socket is still there");
        assert!(other.exists(), "the caller removes its staging name");
    }

    /// The staging name sits beside the socket (`.NAME.PID`), and a path whose staging
    /// name would not fit a socket address has none (bound in place). A socket of ours
    /// left there by a killed start is cleared; anything else is refused, named.
    #[test]
    fn the_staging_name_fits_and_only_our_leftover_socket_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let staged = staging_path(&path).unwrap();
        let want = format!(".s.sock.{:x}", std::process::id());
        assert_eq!(
            (staged.parent(), staged.file_name()),
            (Some(dir.path()), Some(want.as_ref()))
        );
        let long = std::path::Path::new("/run").join("x".repeat(100));
        assert_eq!(staging_path(&long), None);

        remove_own_socket(&staged).unwrap(); // nothing there
        drop(std::os::unix::net::UnixListener::bind(&staged).unwrap());
        remove_own_socket(&staged).unwrap();
        assert!(!staged.exists(), "our leftover socket was removed");
        std::fs::write(&staged, b"not a socket").unwrap();
        let e = remove_own_socket(&staged).unwrap_err();
        assert!(matches!(e, AccessError::Staging { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{}: the daemon binds", staged.display())));
        let mine = format!("is a regular file of uid {}; refusing", crate::sys::euid());
        assert!(e.to_string().contains(&mine), "{e}");
        assert!(staged.exists(), "a file not ours to remove stays");
    }

    #[test]
    fn securing_the_socket_chowns_or_names_the_path() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("millrace-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Our own primary group is always allowed for chown.
        let mine = crate::sys::egid();
        assert_eq!(
            secure_socket(&path, Some(&mine.to_string())).unwrap(),
            Some(mine)
        );
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), mine);
        assert_eq!(secure_socket(&path, None).unwrap(), None);
        let e = secure_socket(&path, Some("millrace-no-such-group")).unwrap_err();
        assert!(e.to_string().contains("millrace-no-such-group"), "{e}");
        let missing = dir.join("missing.sock");
        let e = secure_socket(&missing, Some("0")).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, AccessError::Chmod { .. }), "{text}");
        assert!(
            text.starts_with(&format!("chmod 0660 {}: ", missing.display())),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The socket's directory may be writable by others (a shared `/run` or `/tmp`
    /// directory): one who swaps the socket for a symlink between bind and chmod used to
    /// have the daemon chmod 0660 and chown the symlink's target (`std::fs::set_permissions`
    /// and `chown` follow symlinks). The swap is made here before the call, as the race
    /// would leave it: the target keeps its mode and group, and the refusal names the path.
    #[test]
    fn securing_the_socket_never_follows_a_symlink() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("millrace-swap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("victim");
        std::fs::write(&target, b"secret").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let gid = std::fs::metadata(&target).unwrap().gid();
        let path = dir.join("s.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        // A group other than the target's where we may (root), else our own.
        let other = if crate::sys::euid() == 0 {
            gid ^ 1
        } else {
            gid
        };
        let e = secure_socket(&path, Some(&other.to_string())).unwrap_err();
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(
            meta.mode() & 0o777,
            0o600,
            "the symlink's target was chmodded"
        );
        assert_eq!(meta.gid(), gid, "the symlink's target was chowned");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("not the socket the daemon bound"), "{text}");
        // The socket itself is given its mode and group.
        std::fs::remove_file(&path).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(
            secure_socket(&path, Some(&other.to_string())).unwrap(),
            Some(other)
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, other));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
