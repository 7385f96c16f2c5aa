//! Signed checkpoints: small JSON files that vouch for the state of the log at one moment.
//!
//! Owns the checkpoint format, the signing key and signature checks. A checkpoint is written by the journal writer
//! at every rotation, every `log.checkpoint_every` while records arrive, and when the daemon stops. It names the
//! last `seq` and chain hash, and every log file present with its `seq` range, its length (uncompressed) and the
//! chain hash of its last record, which commits to every byte of every record in it and before it.
//!
//! File `checkpoints/checkpoint-<UTC time to the nanosecond>-<seq, 20 digits>.json` in the log directory, one line:
//!
//! ```text
//! {"checkpoint":1,"created_at":"…","reason":"rotation","seq":N,"hash":"<hex>","files":[{"name":"trail-….jsonl",
//!  "first_seq":1,"last_seq":N,"bytes":B,"last_hash":"<hex>"},…],"key":"<public key, hex>","signature":"<hex>"}
//! ```
//!
//! `signature` is the Ed25519 signature of the line's bytes before `,"signature":"` followed by `}` (the same
//! convention as a record's `hash`), by the key whose public half is `key`. Trust comes from checking it against
//! a public key obtained independently (`trail verify --key`), not against `key`.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain;

/// The directory of checkpoints inside the log directory.
pub const DIR: &str = "checkpoints";

/// A key that cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("signing key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an Ed25519 key.
    #[error(
        "signing key {path}: not an Ed25519 private key in PKCS#8 PEM ({message}); give log.signing_key another path to have one generated"
    )]
    Format {
        /// The key file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
}

/// The checkpoint signing key.
pub struct Signer {
    key: SigningKey,
    /// Where the public key is (written next to the private key).
    pub public_path: PathBuf,
    /// True when this start generated the key.
    pub generated: bool,
}

impl Signer {
    /// Loads the PKCS#8 PEM key at `path`, or generates one (file mode 0600) when there is none; the public key is
    /// written beside it as `<path>.pub` (SPKI PEM).
    pub fn load_or_generate(path: &Path) -> Result<Signer, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut generated = false;
        let key = match std::fs::read_to_string(path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
                path: path.to_owned(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| io(std::io::Error::other(e.to_string())))?;
                let key = SigningKey::from_bytes(&seed);
                let pem = key
                    .to_pkcs8_pem(Default::default())
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                if let Some(parent) = path.parent() {
                    crate::modes::create_dir_all(parent).map_err(io)?;
                }
                let mut file = crate::modes::open(
                    path,
                    std::fs::OpenOptions::new().write(true).create_new(true),
                    crate::modes::SECRET,
                )
                .map_err(io)?;
                file.write_all(pem.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                generated = true;
                key
            }
            Err(e) => return Err(io(e)),
        };
        let public_path = public_path(path);
        let public = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        if std::fs::read_to_string(&public_path).ok().as_deref() != Some(public.as_str()) {
            crate::modes::write(&public_path, public.as_bytes()).map_err(|source| {
                KeyError::Io {
                    path: public_path.clone(),
                    source,
                }
            })?;
        }
        Ok(Signer {
            key,
            public_path,
            generated,
        })
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        chain::hex(self.key.verifying_key().as_bytes())
    }
}

/// Where the public half of the key at `private` is written.
pub fn public_path(private: &Path) -> PathBuf {
    let mut p = private.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Reads a public key: a PEM file (SPKI), a file holding 64 hex digits, or 64 hex digits given directly.
pub fn read_public_key(text_or_path: &str) -> Result<VerifyingKey, String> {
    let text = match std::fs::read_to_string(text_or_path) {
        Ok(t) => t,
        Err(_) if text_or_path.len() == 64 => text_or_path.to_owned(),
        Err(e) => return Err(format!("cannot read public key {text_or_path}: {e}")),
    };
    let text = text.trim();
    if let Some(bytes) = chain::parse_hex(text.as_bytes()) {
        return VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("not an Ed25519 public key: {e}"));
    }
    VerifyingKey::from_public_key_pem(text)
        .map_err(|e| format!("{text_or_path}: not an Ed25519 public key in PEM or hex ({e})"))
}

/// One log file as a checkpoint saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// `trail-….jsonl` (also when the file is later compressed).
    pub name: String,
    /// First `seq` it may hold (from its name).
    pub first_seq: u64,
    /// Its last record's `seq`; absent when it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Its length, uncompressed.
    pub bytes: u64,
    /// The chain hash of its last record; absent when it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
}

/// The format version of the checkpoints this daemon writes (see [`Body::checkpoint`]).
pub const FORMAT: u32 = 3;

/// What a checkpoint says, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Format version: 1; 2 from daemons that record `trail_started` as the first record of every start (only
    /// after a `stop` checkpoint of version 2 or later is a record other than `trail_started` a problem); 3 when
    /// the tree's leaves are built from each record's `seq` and inner digest ([`super::tree`]). The tree fields
    /// of a version-2 checkpoint (whose leaves were the record lines, in development versions) are not checked.
    pub checkpoint: u32,
    /// When it was written (the daemon's clock).
    pub created_at: String,
    /// `rotation`, `interval` or `stop`.
    pub reason: String,
    /// The last record's `seq` (absent before the first record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The chain head: the last record's hash, or the genesis value.
    pub hash: String,
    /// Every log file present, oldest first; the last one was open for appending.
    pub files: Vec<FileEntry>,
    /// The Merkle tree's size at `seq`: the records from the first one of the log up to `seq` ([`super::tree`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_size: Option<u64>,
    /// The tree's root at that size, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_root: Option<String>,
    /// The signer's public key, hex.
    pub key: String,
}

/// The C2SP origin (and note key name) of the log signed by `key`: `trail/` and the first 16 hex digits of the
/// public key.
pub fn origin(key: &VerifyingKey) -> String {
    format!("trail/{}", &chain::hex(key.as_bytes())[..16])
}

/// The name of the C2SP `tlog-checkpoint` note written beside the checkpoint `json_name`: `.json` becomes `.note`.
pub fn note_name(json_name: &str) -> String {
    format!("{}.note", json_name.trim_end_matches(".json"))
}

/// Signs notes with the checkpoint key.
struct NoteSigner<'a> {
    name: String,
    id: u32,
    key: &'a SigningKey,
}

impl signed_note::Signer for NoteSigner<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// The C2SP `tlog-checkpoint` of the tree of `size` leaves whose root is `root`, as a signed note (Ed25519, key
/// name [`origin`]).
pub fn note(signer: &Signer, size: u64, root: &super::tree::Hash) -> Vec<u8> {
    let name = origin(&signer.key.verifying_key());
    let body = tlog_tiles::Checkpoint::new(&name, size, *root, "").expect("a valid origin");
    let mut public = vec![1u8];
    public.extend_from_slice(signer.key.verifying_key().as_bytes());
    let id = signed_note::key_id(&name, &public);
    let mut note = signed_note::Note::new(&body.to_bytes(), &[]).expect("a valid note");
    let signer = NoteSigner {
        name,
        id,
        key: &signer.key,
    };
    note.add_sigs(&[&signer]).expect("signing cannot fail");
    note.to_bytes()
}

/// What a checked note says: origin, tree size and root.
#[derive(Debug, Clone, PartialEq)]
pub struct NoteBody {
    /// The log's origin.
    pub origin: String,
    /// The tree size.
    pub size: u64,
    /// The tree root.
    pub root: super::tree::Hash,
}

/// Checks a C2SP `tlog-checkpoint` note against `key` (a signature by the key, under the key name [`origin`]),
/// and reads it.
pub fn open_note(text: &[u8], key: &VerifyingKey) -> Result<NoteBody, String> {
    let name = origin(key);
    let verifier =
        signed_note::StandardVerifier::new(&signed_note::new_ed25519_verifier_key(&name, key))
            .map_err(|e| format!("the key: {e}"))?;
    let note =
        signed_note::Note::from_bytes(text).map_err(|e| format!("not a signed note: {e}"))?;
    let (verified, _) = note
        .verify(&signed_note::VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| format!("the note's signature does not verify with the key ({e})"))?;
    if verified.is_empty() {
        return Err("the note is not signed by the key".into());
    }
    let body = tlog_tiles::Checkpoint::from_bytes(note.text())
        .map_err(|e| format!("not a tlog checkpoint: {e}"))?;
    if body.origin() != name {
        return Err(format!("the note is for {}, not {name}", body.origin()));
    }
    Ok(NoteBody {
        origin: body.origin().to_owned(),
        size: body.size(),
        root: *body.hash(),
    })
}

const SIGNATURE_FIELD: &[u8] = b",\"signature\":\"";

/// Writes a signed checkpoint into `log_dir/checkpoints/` (written aside, synced, renamed) and returns its path.
pub fn write(log_dir: &Path, signer: &Signer, body: &Body) -> std::io::Result<PathBuf> {
    write_line(log_dir, body, &sign(signer, body))
}

/// The signed checkpoint line of `body`, with its newline.
pub fn sign(signer: &Signer, body: &Body) -> Vec<u8> {
    let mut line = serde_json::to_vec(body).expect("serializable");
    let signature = signer.key.sign(&line);
    line.pop();
    line.extend_from_slice(SIGNATURE_FIELD);
    chain::push_hex(&mut line, &signature.to_bytes());
    line.extend_from_slice(b"\"}\n");
    line
}

/// Writes the signed checkpoint `line` of `body` into `log_dir/checkpoints/` and returns its path.
pub fn write_line(log_dir: &Path, body: &Body, line: &[u8]) -> std::io::Result<PathBuf> {
    let dir = log_dir.join(DIR);
    crate::modes::create_dir_all(&dir)?;
    // The name carries the creation time to the nanosecond and the seq, so two checkpoints of one second (a stop
    // right after a rotation) never share a name. The bytes are written to a temporary file of that name alone
    // (two checkpoints may be written at once), synced, and then linked to their name, which fails when the name
    // exists: a checkpoint is created exclusively and never replaced, and never seen half-written.
    let name = file_name(body);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = crate::modes::open(
            &tmp,
            std::fs::OpenOptions::new().write(true).create_new(true),
            crate::modes::FILE,
        )?;
        file.write_all(line)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, &path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                std::io::Error::new(
                    e.kind(),
                    format!("{} exists: checkpoints are never replaced", path.display()),
                )
            } else {
                e
            }
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

/// A checkpoint written: where, its line, and its note (absent when the tree could not be computed).
pub struct Written {
    /// The checkpoint file.
    pub path: PathBuf,
    /// Its line, as signed.
    pub line: Vec<u8>,
    /// The C2SP note written beside it.
    pub note: Option<Vec<u8>>,
}

/// Completes `body` with the Merkle tree at its `seq` (bringing the cache up to date from the log files), signs
/// it, and writes the checkpoint and its note. A tree that cannot be computed is returned as the second value;
/// the checkpoint is then written without it. `None` when retention deleted every record it covers while it was
/// being completed: retention removes such checkpoints, so it is not written (see [`super::tree::Keeper::files_lock`]).
pub fn write_with_tree(
    log_dir: &Path,
    signer: &Signer,
    tree: Option<&super::tree::Keeper>,
    mut body: Body,
) -> std::io::Result<Option<(Written, Option<super::tree::Error>)>> {
    let mut failed = None;
    let mut root = None;
    if let Some(tree) = tree {
        let computed = match body.seq {
            Some(_) => tree.root_at(body.seq),
            None => Ok((0, tlog_tiles::EMPTY_HASH)),
        };
        match computed {
            Ok((size, hash)) => {
                body.tree_size = Some(size);
                body.tree_root = Some(chain::hex(&hash.0));
                root = Some((size, hash));
            }
            Err(e) => failed = Some(e),
        }
    }
    let _deleting = tree.map(|t| t.files_lock());
    if let Some(seq) = body.seq
        && super::files::list(log_dir)?
            .first()
            .is_some_and(|f| f.first_seq > seq)
    {
        return Ok(None);
    }
    let line = sign(signer, &body);
    let path = write_line(log_dir, &body, &line)?;
    let note = match root {
        Some((size, hash)) => {
            let note = note(signer, size, &hash);
            write_note(log_dir, &file_name(&body), &note)?;
            Some(note)
        }
        None => None,
    };
    Ok(Some((Written { path, line, note }, failed)))
}

/// Writes the note of the checkpoint `json_name` beside it, created exclusively like the checkpoint.
pub fn write_note(log_dir: &Path, json_name: &str, note: &[u8]) -> std::io::Result<PathBuf> {
    let dir = log_dir.join(DIR);
    let name = note_name(json_name);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = crate::modes::open(
            &tmp,
            std::fs::OpenOptions::new().write(true).create_new(true),
            crate::modes::FILE,
        )?;
        file.write_all(note)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

/// The file name of the checkpoint `body`: `checkpoint-<created_at without separators>-<seq, 20 digits>.json`.
pub fn file_name(body: &Body) -> String {
    let time = body.created_at.replace(['-', ':'], "");
    format!(
        "checkpoint-{}Z-{:020}.json",
        time.get(..25).unwrap_or("0"),
        body.seq.unwrap_or(0)
    )
}

/// A checkpoint read from a file.
#[derive(Debug)]
pub struct Checkpoint {
    /// What it says.
    pub body: Body,
    message: Vec<u8>,
    signature: Signature,
}

impl Checkpoint {
    /// Parses a checkpoint file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, String> {
        let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let at = memchr::memmem::rfind(line, SIGNATURE_FIELD)
            .ok_or("no signature field: not a trail checkpoint")?;
        let hex = line[at + SIGNATURE_FIELD.len()..]
            .strip_suffix(b"\"}")
            .ok_or("the signature field is not the last one")?;
        if hex.len() != 128 {
            return Err("the signature is not 64 bytes of hex".into());
        }
        let mut sig = [0u8; 64];
        for (i, half) in hex.chunks(64).enumerate() {
            let part = chain::parse_hex(half).ok_or("the signature is not hex")?;
            sig[i * 32..i * 32 + 32].copy_from_slice(&part);
        }
        let mut message = line[..at].to_vec();
        message.push(b'}');
        let body: Body =
            serde_json::from_slice(&message).map_err(|e| format!("unreadable: {e}"))?;
        Ok(Checkpoint {
            body,
            message,
            signature: Signature::from_bytes(&sig),
        })
    }

    /// Checks the signature against `key`, or, without one, against the key the checkpoint names.
    pub fn check_signature(&self, key: Option<&VerifyingKey>) -> Result<(), String> {
        let named;
        let key = match key {
            Some(k) => k,
            None => {
                let bytes = chain::parse_hex(self.body.key.as_bytes())
                    .ok_or("the key field is not 64 hex digits")?;
                named = VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())?;
                &named
            }
        };
        key.verify(&self.message, &self.signature).map_err(|_| {
            "bad signature: the checkpoint was altered or signed by another key".to_string()
        })
    }
}

/// The checkpoint files of a log directory, oldest first.
pub fn list(log_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(log_dir.join(DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            checkpoint: 1,
            created_at: "2026-11-20T00:00:00.000000000Z".into(),
            reason: "rotation".into(),
            seq: Some(3),
            hash: chain::hex(&[7; 32]),
            files: vec![FileEntry {
                name: "trail-20261120T000000Z-00000000000000000001.jsonl".into(),
                first_seq: 1,
                last_seq: Some(3),
                bytes: 900,
                last_hash: Some(chain::hex(&[7; 32])),
            }],
            tree_size: Some(3),
            tree_root: Some(chain::hex(&[8; 32])),
            key: String::new(),
        }
    }

    #[test]
    fn keys_are_generated_once_and_checkpoints_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("checkpoint.pem");
        let signer = Signer::load_or_generate(&path).unwrap();
        assert!(signer.generated);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Signer::load_or_generate(&path).unwrap();
        assert!(!again.generated);
        assert_eq!(again.public_hex(), signer.public_hex());
        let public = read_public_key(signer.public_path.to_str().unwrap()).unwrap();
        assert_eq!(chain::hex(public.as_bytes()), signer.public_hex());

        let mut b = body();
        b.key = signer.public_hex();
        let written = write(dir.path(), &signer, &b).unwrap();
        assert_eq!(list(dir.path()), vec![written.clone()]);
        let bytes = std::fs::read(&written).unwrap();
        let cp = Checkpoint::parse(&bytes).unwrap();
        assert_eq!(cp.body, b);
        cp.check_signature(Some(&public)).unwrap();
        cp.check_signature(None).unwrap();

        let other = Signer::load_or_generate(&dir.path().join("other.pem")).unwrap();
        let other_public = read_public_key(&other.public_hex()).unwrap();
        assert!(cp.check_signature(Some(&other_public)).is_err());
        // Any change to the signed bytes is caught.
        let text = String::from_utf8(bytes.clone()).unwrap();
        // Created exclusively: the same checkpoint again is refused, and the first stays as it was.
        let again = write(dir.path(), &signer, &b).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists, "{again}");
        assert_eq!(std::fs::read(&written).unwrap(), bytes);
        for (from, to) in [
            ("\"seq\":3", "\"seq\":4"),
            ("rotation", "rotatiom"),
            ("900", "901"),
        ] {
            let edited = text.replacen(from, to, 1);
            let cp = Checkpoint::parse(edited.as_bytes()).unwrap();
            assert!(cp.check_signature(Some(&public)).is_err(), "{from}");
        }
    }

    #[test]
    fn checkpoints_written_at_once_are_all_kept() {
        // A rotation's checkpoint is still being written when the stop's is: each has a temporary file of its own.
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_generate(&dir.path().join("k.pem")).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (dir, signer) = (
                    dir.path().to_owned(),
                    Signer::load_or_generate(&dir.path().join("k.pem")).unwrap(),
                );
                std::thread::spawn(move || {
                    let mut b = body();
                    b.seq = Some(i);
                    b.created_at = format!("2026-11-20T00:00:00.00000000{i}Z");
                    write(&dir, &signer, &b).unwrap()
                })
            })
            .collect();
        let mut written: Vec<PathBuf> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        written.sort();
        assert_eq!(list(dir.path()), written);
        for p in &written {
            let cp = Checkpoint::parse(&std::fs::read(p).unwrap()).unwrap();
            cp.check_signature(Some(&signer.verifying_key())).unwrap();
            assert_eq!(
                p.file_name().unwrap().to_str().unwrap(),
                file_name(&cp.body)
            );
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
