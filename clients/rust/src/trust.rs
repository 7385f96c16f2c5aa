//! Whether a socket path can be trusted: who owns the socket and who may write the directories above it.
//!
//! Owns the checks that the daemon makes before it binds a socket and that clients make before they connect; it
//! never binds or connects itself. A socket is only as trustworthy as every directory on its path: whoever may
//! write one of them can rename an entry away and put a socket of their own in its place, and a client would then
//! hand its events to an impostor that answers `{"ok":true}` and logs nothing.
//!
//! The rule, for a set of trusted users (root and the checking process's own user, plus for a client the user it
//! was told to expect): every directory from the root down to the socket's own is owned by a trusted user and
//! cannot be written by its group or by others. A directory above the socket's own may be writable by others when
//! it has the sticky bit (as `/tmp` has): nobody but an entry's owner may then rename or remove it, and the entry
//! below is checked in turn. The socket's own directory gets no such exception: in a sticky directory anyone may
//! still create the socket's name first. Group write counts as writable by others, and so do POSIX ACLs that
//! grant write to someone else, because they show in the group bits of the mode.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The users a socket (and the directories above it) may belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    uids: Vec<u32>,
}

impl Owners {
    /// Root and this process's effective user.
    pub fn me() -> Owners {
        let mut uids = vec![0];
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            uids.push(euid);
        }
        Owners { uids }
    }

    /// Also trusts `uid`.
    pub fn and(mut self, uid: u32) -> Owners {
        if !self.uids.contains(&uid) {
            self.uids.push(uid);
        }
        self
    }

    /// Also trusts the user `who`: a user name or a numeric uid. `origin` names where it came from in errors
    /// (an option or a variable).
    pub fn and_user(self, who: &str, origin: &str) -> Result<Owners, String> {
        let who = who.trim();
        if !who.is_empty() && who.bytes().all(|b| b.is_ascii_digit()) {
            return who
                .parse::<u32>()
                .map(|uid| self.and(uid))
                .map_err(|_| format!("{origin}: {who:?} is not a uid"));
        }
        match nix::unistd::User::from_name(who) {
            Ok(Some(user)) => Ok(self.and(user.uid.as_raw())),
            Ok(None) => Err(format!(
                "{origin}: there is no user {who:?}; give a user name or a uid"
            )),
            Err(e) => Err(format!("{origin}: cannot look up user {who:?}: {e}")),
        }
    }

    /// Whether `uid` is trusted.
    pub fn contains(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
}

impl fmt::Display for Owners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, uid) in self.uids.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", user(*uid))?;
        }
        Ok(())
    }
}

/// `uid 1001 (alice)`, or `uid 1001` when it has no name.
pub fn user(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Why a socket path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// A directory or the socket could not be examined.
    #[error("cannot examine {path}: {source}")]
    Io {
        /// What was examined.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A directory belongs to someone who is not trusted.
    #[error(
        "directory {dir} belongs to {owner}, who could replace the socket; only directories of {trusted} are \
         trusted: put the socket in a directory of root or the daemon's user (e.g. /run/trail), or, for a client \
         of a daemon that runs as that user, say so with --socket-owner or TRAIL_SOCKET_OWNER"
    )]
    DirOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: String,
        /// Who is trusted.
        trusted: String,
    },
    /// A directory can be written by others.
    #[error(
        "directory {dir} (mode {mode:04o}) can be written by users other than its owner, who could replace the \
         socket; use a directory only its owner can write (mode 0755 or stricter), e.g. /run/trail"
    )]
    Writable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A symbolic link is where the socket should be.
    #[error(
        "{0} is a symbolic link; a socket path must name the socket itself, never a link to it"
    )]
    Symlink(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} is not a socket")]
    NotSocket(PathBuf),
    /// The socket belongs to someone who is not trusted.
    #[error(
        "socket {path} belongs to {owner}, not to {trusted}; if the daemon runs as that user, say so with \
         --socket-owner or TRAIL_SOCKET_OWNER"
    )]
    SocketOwner {
        /// The socket.
        path: PathBuf,
        /// Its owner.
        owner: String,
        /// Who is trusted.
        trusted: String,
    },
    /// The process that accepted the connection runs as someone who is not trusted.
    #[error(
        "the process listening on {path} runs as {peer}, not as {trusted}; if the daemon runs as that user, say \
         so with --socket-owner or TRAIL_SOCKET_OWNER"
    )]
    Peer {
        /// The socket.
        path: PathBuf,
        /// The listening process's user.
        peer: String,
        /// Who is trusted.
        trusted: String,
    },
}

/// A copy; an I/O cause is copied as its kind and message (`std::io::Error` itself cannot be cloned).
impl Clone for Untrusted {
    fn clone(&self) -> Untrusted {
        match self {
            Untrusted::Io { path, source } => Untrusted::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Untrusted::DirOwner {
                dir,
                owner,
                trusted,
            } => Untrusted::DirOwner {
                dir: dir.clone(),
                owner: owner.clone(),
                trusted: trusted.clone(),
            },
            Untrusted::Writable { dir, mode } => Untrusted::Writable {
                dir: dir.clone(),
                mode: *mode,
            },
            Untrusted::Symlink(p) => Untrusted::Symlink(p.clone()),
            Untrusted::NotSocket(p) => Untrusted::NotSocket(p.clone()),
            Untrusted::SocketOwner {
                path,
                owner,
                trusted,
            } => Untrusted::SocketOwner {
                path: path.clone(),
                owner: owner.clone(),
                trusted: trusted.clone(),
            },
            Untrusted::Peer {
                path,
                peer,
                trusted,
            } => Untrusted::Peer {
                path: path.clone(),
                peer: peer.clone(),
                trusted: trusted.clone(),
            },
        }
    }
}

impl From<Untrusted> for std::io::Error {
    fn from(e: Untrusted) -> std::io::Error {
        let kind = match &e {
            Untrusted::Io { source, .. } => source.kind(),
            _ => std::io::ErrorKind::PermissionDenied,
        };
        std::io::Error::new(kind, e)
    }
}

/// Checks `dir` (the directory a socket is or will be in) and every directory above it; returns its canonical
/// path, which is the path to bind or connect through: a symbolic link on the way could be changed by the owner of
/// the directory that holds it, which the canonical path does not pass through.
pub fn check_dir(dir: &Path, owners: &Owners) -> Result<PathBuf, Untrusted> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let canonical = std::fs::canonicalize(dir).map_err(|source| Untrusted::Io {
        path: dir.to_owned(),
        source,
    })?;
    for (i, d) in canonical.ancestors().enumerate() {
        let meta = std::fs::symlink_metadata(d).map_err(|source| Untrusted::Io {
            path: d.to_owned(),
            source,
        })?;
        if !owners.contains(meta.uid()) {
            return Err(Untrusted::DirOwner {
                dir: d.to_owned(),
                owner: user(meta.uid()),
                trusted: owners.to_string(),
            });
        }
        let mode = meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && (i == 0 || !sticky) {
            return Err(Untrusted::Writable {
                dir: d.to_owned(),
                mode,
            });
        }
    }
    Ok(canonical)
}

/// Checks a client's socket path: its directories ([`check_dir`]), then the socket itself (not followed if it is
/// a link: a socket, owned by a trusted user). Returns the canonical path to connect to.
///
/// Checking and then connecting is a race in general; it is sound here only because no untrusted user can write
/// any directory on the path, so nobody else can replace the socket between the check and the connect.
pub fn check_socket(path: &Path, owners: &Owners) -> Result<PathBuf, Untrusted> {
    let Some(name) = path.file_name() else {
        return Err(Untrusted::NotSocket(path.to_owned()));
    };
    let dir = check_dir(path.parent().unwrap_or(Path::new(".")), owners)?;
    let socket = dir.join(name);
    let meta = std::fs::symlink_metadata(&socket).map_err(|source| Untrusted::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(Untrusted::Symlink(path.to_owned()));
    }
    if !meta.file_type().is_socket() {
        return Err(Untrusted::NotSocket(path.to_owned()));
    }
    if !owners.contains(meta.uid()) {
        return Err(Untrusted::SocketOwner {
            path: path.to_owned(),
            owner: user(meta.uid()),
            trusted: owners.to_string(),
        });
    }
    Ok(socket)
}

/// Checks that the process at the other end of `stream` (the one that called `listen`) runs as a trusted user
/// (`SO_PEERCRED`): the strongest check, since a trusted socket file could still have been bound by someone else
/// before it was made trusted.
pub fn check_peer(
    stream: &impl std::os::fd::AsFd,
    path: &Path,
    owners: &Owners,
) -> Result<(), Untrusted> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Untrusted::Io {
            path: path.to_owned(),
            source: e.into(),
        })?;
    if owners.contains(cred.uid()) {
        Ok(())
    } else {
        Err(Untrusted::Peer {
            path: path.to_owned(),
            peer: user(cred.uid()),
            trusted: owners.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir_with_mode(mode: u32) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn writable_and_sticky_directories() {
        let me = Owners::me();
        let check = |mode: u32, ok: bool| {
            let d = dir_with_mode(mode);
            let got = check_dir(d.path(), &me);
            assert_eq!(got.is_ok(), ok, "{mode:o}: {got:?}");
            // Below such a directory, a private one is fine only when it is sticky.
            let inner = d.path().join("inner");
            std::fs::create_dir(&inner).unwrap();
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
            let below = check_dir(&inner, &me);
            assert_eq!(below.is_ok(), ok || mode & 0o1000 != 0, "{mode:o}/inner");
        };
        check(0o700, true);
        check(0o755, true);
        check(0o775, false);
        check(0o757, false);
        check(0o1777, false);
        check(0o1770, false);
    }

    #[test]
    fn owners_from_names_and_uids() {
        let me = Owners::me();
        assert!(me.contains(0));
        assert!(
            me.clone()
                .and_user("4242", "--socket-owner")
                .unwrap()
                .contains(4242)
        );
        assert!(
            me.clone()
                .and_user("root", "--socket-owner")
                .unwrap()
                .contains(0)
        );
        let err = me
            .and_user("no-such-user-here", "TRAIL_SOCKET_OWNER")
            .unwrap_err();
        assert!(
            err.contains("TRAIL_SOCKET_OWNER") && err.contains("no user"),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_or_a_file_is_not_a_socket() {
        let d = dir_with_mode(0o700);
        let me = Owners::me();
        std::fs::write(d.path().join("file"), b"").unwrap();
        std::os::unix::fs::symlink(d.path().join("file"), d.path().join("link")).unwrap();
        assert!(matches!(
            check_socket(&d.path().join("link"), &me),
            Err(Untrusted::Symlink(_))
        ));
        assert!(matches!(
            check_socket(&d.path().join("file"), &me),
            Err(Untrusted::NotSocket(_))
        ));
        let _listener = std::os::unix::net::UnixListener::bind(d.path().join("s.sock")).unwrap();
        assert!(check_socket(&d.path().join("s.sock"), &me).is_ok());
    }
}
