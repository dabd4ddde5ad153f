//! Instance discovery: each running VM owns a private runtime directory,
//! `$XDG_RUNTIME_DIR/minivmm/NAME/` for a user or `/run/minivmm/NAME/` for root, holding its
//! QMP socket and an `instance.json` (pid, name, uuid, start time, consoles).
//!
//! Directories are created 0700; an existing one with another owner or a looser mode is
//! refused, never repaired, since someone else may have prepared it. A name or uuid already
//! used by a live instance is refused; the directory of a dead process is stale and is
//! replaced or removed by [`remove_stale`]. Liveness compares the recorded process start time
//! too, so a recycled pid does not keep a dead instance alive. [`Instance`] removes its
//! directory on drop.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::fmt::Hyphenated;
use uuid::{Builder, Uuid};

use crate::sys;

/// Mode of the runtime directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the instance file.
pub const FILE_MODE: u32 = 0o600;
/// Name of the instance file inside an instance directory.
pub const INSTANCE_FILE: &str = "instance.json";
/// Name of the QMP socket inside an instance directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// Subdirectory of the runtime root.
pub const APP_DIR: &str = "minivmm";
/// The root's runtime directory for root.
pub const SYSTEM_RUNTIME_DIR: &str = "/run";
/// Longest instance name.
pub const MAX_NAME_LEN: usize = 64;
/// How long a directory without an instance file is taken as starting, not stale.
pub const STARTING_GRACE: Duration = Duration::from_secs(10);
/// Attempts at claiming a name whose stale directory keeps coming back.
const CLAIM_ATTEMPTS: usize = 3;

/// Setting up, reading or cleaning instance directories failed.
#[derive(Debug, Error)]
pub enum InstanceError {
    /// A bad `--name`.
    #[error("bad instance name '{0}' (1 to 64 of letters, digits, '-', '_', '.', not starting with '.')")]
    BadName(String),
    /// A bad `--uuid`.
    #[error("bad uuid '{0}' (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
    BadUuid(String),
    /// The name is taken by a live instance.
    #[error("an instance named '{name}' is already running (pid {pid})")]
    NameInUse {
        /// The name.
        name: String,
        /// Its pid.
        pid: i32,
    },
    /// The uuid is taken by a live instance.
    #[error("uuid {uuid} is already used by instance '{name}' (pid {pid})")]
    UuidInUse {
        /// The uuid.
        uuid: String,
        /// The instance using it.
        name: String,
        /// Its pid.
        pid: i32,
    },
    /// The directory belongs to someone else.
    #[error("'{path}' is owned by uid {owner}, not by uid {expected}: refusing to use it")]
    WrongOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        expected: u32,
    },
    /// The directory's mode is not 0700.
    #[error("'{path}' has mode {mode:04o}, expected 0700: refusing to use it")]
    WrongMode {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Not a directory (or a symlink).
    #[error("'{0}' exists and is not a directory")]
    NotADirectory(PathBuf),
    /// No instance of that name.
    #[error("no running instance named '{0}'")]
    NotFound(String),
    /// An OS call failed.
    #[error("cannot {op} '{path}'")]
    Io {
        /// What we tried.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstanceError + 'a {
    move |source| InstanceError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A console of the instance, for `minivmm console NAME [PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    /// What the user names it by: a port name or `serial0`.
    pub name: String,
    /// The chardev id.
    pub chardev: String,
    /// The backend kind (`socket`, `pty`, ...).
    pub kind: String,
    /// Where to attach: the socket path or the pty.
    pub path: Option<PathBuf>,
}

/// The content of `instance.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Process id of the VMM.
    pub pid: i32,
    /// Instance name.
    pub name: String,
    /// VM uuid.
    pub uuid: String,
    /// Start time, seconds since the epoch.
    pub start_time: u64,
    /// The process start time in clock ticks since boot (`/proc/PID/stat`), to tell a
    /// recycled pid from ours.
    #[serde(default)]
    pub proc_start: Option<u64>,
    /// The QMP socket, if any.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// The consoles.
    #[serde(default)]
    pub consoles: Vec<ConsoleInfo>,
    /// minivmm version.
    #[serde(default)]
    pub version: String,
}

impl InstanceInfo {
    /// Whether the process that wrote this is still running.
    pub fn is_alive(&self) -> bool {
        if self.pid == std::process::id() as i32 {
            return true;
        }
        if !sys::process_alive(self.pid) {
            return false;
        }
        match (self.proc_start, proc_start_ticks(self.pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            _ => true,
        }
    }
}

/// The start time of process `pid` in clock ticks since boot.
pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come field 3 (state) onwards; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// What `instance create` takes.
#[derive(Debug, Clone, Default)]
pub struct InstanceConfig {
    /// `--name`; default `vm-PID`.
    pub name: Option<String>,
    /// `--uuid`; default random.
    pub uuid: Option<String>,
    /// The runtime root (`.../minivmm`); default [`runtime_root`].
    pub root: Option<PathBuf>,
}

/// Check an instance name: it becomes a directory name.
pub fn validate_name(name: &str) -> Result<(), InstanceError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(InstanceError::BadName(name.to_string()))
    }
}

/// Check a uuid in its canonical hyphenated form (QEMU's `-uuid` takes no other); returns it
/// lowercased.
pub fn validate_uuid(uuid: &str) -> Result<String, InstanceError> {
    let bad = || InstanceError::BadUuid(uuid.to_string());
    if uuid.len() != Hyphenated::LENGTH {
        return Err(bad());
    }
    Uuid::try_parse(uuid)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| bad())
}

/// A random (version 4) uuid, from the kernel's random bytes.
pub fn generate_uuid() -> io::Result<String> {
    let mut bytes = uuid::Bytes::default();
    sys::random_bytes(&mut bytes)?;
    Ok(Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string())
}

/// Environment variable that overrides [`runtime_root`] (tests, several separate sets of
/// instances on one host).
pub const RUNTIME_DIR_ENV: &str = "MINIVMM_RUNTIME_DIR";

/// The runtime root: `$MINIVMM_RUNTIME_DIR` if set, else `/run/minivmm` for root,
/// `$XDG_RUNTIME_DIR/minivmm` for a user, or `/tmp/minivmm-UID` when the user has no runtime
/// directory.
pub fn runtime_root() -> PathBuf {
    if let Some(d) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let uid = sys::euid();
    if uid == 0 {
        return Path::new(SYSTEM_RUNTIME_DIR).join(APP_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join(APP_DIR),
        _ => std::env::temp_dir().join(format!("{APP_DIR}-{uid}")),
    }
}

/// Make sure `path` is a directory owned by us with mode 0700, creating it if needed.
pub fn ensure_private_dir(path: &Path) -> Result<(), InstanceError> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {
            // The umask may have taken bits away; never more than 0700 was asked for.
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
                .map_err(io_err("set the mode of", path))?;
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create", path)(e)),
    }
    check_private_dir(path)
}

/// Check an existing directory: ours, 0700, not a symlink.
pub fn check_private_dir(path: &Path) -> Result<(), InstanceError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if !meta.file_type().is_dir() {
        return Err(InstanceError::NotADirectory(path.to_path_buf()));
    }
    let uid = sys::euid();
    if meta.uid() != uid {
        return Err(InstanceError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode != DIR_MODE {
        return Err(InstanceError::WrongMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// One entry of [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedInstance {
    /// The directory.
    pub dir: PathBuf,
    /// Its name (the directory name).
    pub name: String,
    /// The instance file, if readable.
    pub info: Option<InstanceInfo>,
    /// Whether its process runs (or it is still starting).
    pub alive: bool,
}

fn read_info(dir: &Path) -> Option<InstanceInfo> {
    let text = fs::read_to_string(dir.join(INSTANCE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn recently_modified(dir: &Path) -> bool {
    fs::symlink_metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < STARTING_GRACE)
}

/// Every instance directory under `root`, sorted by name. A missing root lists nothing.
pub fn list(root: &Path) -> Result<Vec<ListedInstance>, InstanceError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", root))?;
        let dir = entry.path();
        let is_dir = fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir());
        if !is_dir {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let info = read_info(&dir);
        let alive = match &info {
            Some(i) => i.is_alive(),
            None => recently_modified(&dir),
        };
        out.push(ListedInstance {
            dir,
            name,
            info,
            alive,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Remove the directories of dead instances under `root`; returns their names. Directories
/// owned by someone else are left alone.
pub fn remove_stale(root: &Path) -> Result<Vec<String>, InstanceError> {
    let mut removed = Vec::new();
    for inst in list(root)? {
        if inst.alive {
            continue;
        }
        let ours = fs::symlink_metadata(&inst.dir).is_ok_and(|m| m.uid() == sys::euid());
        if !ours {
            continue;
        }
        fs::remove_dir_all(&inst.dir).map_err(io_err("remove stale", &inst.dir))?;
        removed.push(inst.name);
    }
    Ok(removed)
}

/// The live instance named `name`.
pub fn find(root: &Path, name: &str) -> Result<InstanceInfo, InstanceError> {
    validate_name(name)?;
    let dir = root.join(name);
    match read_info(&dir) {
        Some(info) if info.is_alive() => Ok(info),
        _ => Err(InstanceError::NotFound(name.to_string())),
    }
}

/// This process's instance directory, removed on drop.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    info: InstanceInfo,
}

impl Instance {
    /// Claim the runtime directory for this process: check the root, refuse a name or
    /// uuid a live instance uses, replace a stale directory, write the instance file.
    pub fn create(cfg: &InstanceConfig) -> Result<Self, InstanceError> {
        let pid = std::process::id() as i32;
        let name = cfg.name.clone().unwrap_or_else(|| format!("vm-{pid}"));
        validate_name(&name)?;
        let uuid = match &cfg.uuid {
            Some(u) => validate_uuid(u)?,
            None => generate_uuid().map_err(io_err("generate a uuid for", Path::new(&name)))?,
        };
        let root = cfg.root.clone().unwrap_or_else(runtime_root);
        if let Some(parent) = root.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
        }
        ensure_private_dir(&root)?;
        for other in list(&root)? {
            let Some(info) = other.info.filter(|_| other.alive) else {
                continue;
            };
            if info.uuid == uuid {
                return Err(InstanceError::UuidInUse {
                    uuid,
                    name: info.name,
                    pid: info.pid,
                });
            }
        }
        let dir = root.join(&name);
        claim_dir(&dir, &name)?;
        let info = InstanceInfo {
            pid,
            name,
            uuid,
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            proc_start: proc_start_ticks(pid),
            qmp: None,
            consoles: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let inst = Instance { dir, info };
        inst.write()?;
        Ok(inst)
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the QMP socket goes.
    pub fn qmp_socket_path(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }

    /// What the instance file says.
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    /// Record the QMP socket.
    pub fn set_qmp(&mut self, path: Option<PathBuf>) -> Result<(), InstanceError> {
        self.info.qmp = path;
        self.write()
    }

    /// Record the consoles (once their chardevs exist, so pty paths are known).
    pub fn set_consoles(&mut self, consoles: Vec<ConsoleInfo>) -> Result<(), InstanceError> {
        self.info.consoles = consoles;
        self.write()
    }

    /// Write the instance file atomically (temporary file, then rename), mode 0600.
    fn write(&self) -> Result<(), InstanceError> {
        let path = self.dir.join(INSTANCE_FILE);
        let tmp = self.dir.join(format!(".{INSTANCE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.info)
            .map_err(|e| io_err("encode", &path)(io::Error::other(e)))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(io_err("write", &tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("write", &path))
    }
}

/// Create `dir` 0700, or take it over from a dead instance.
fn claim_dir(dir: &Path, name: &str) -> Result<(), InstanceError> {
    for _ in 0..CLAIM_ATTEMPTS {
        match DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => {
                fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(io_err("set the mode of", dir))?;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", dir)(e)),
        }
        check_private_dir(dir)?;
        match read_info(dir) {
            Some(info) if info.is_alive() => {
                return Err(InstanceError::NameInUse {
                    name: name.to_string(),
                    pid: info.pid,
                })
            }
            None if recently_modified(dir) => {
                return Err(InstanceError::NameInUse {
                    name: name.to_string(),
                    pid: 0,
                })
            }
            _ => {
                log::info!("removing stale instance directory {}", dir.display());
                fs::remove_dir_all(dir).map_err(io_err("remove stale", dir))?;
            }
        }
    }
    Err(io_err("create", dir)(io::Error::from(
        io::ErrorKind::AlreadyExists,
    )))
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, name: &str) -> InstanceConfig {
        InstanceConfig {
            name: Some(name.into()),
            uuid: None,
            root: Some(root.to_path_buf()),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    /// A pid that surely is not running: a child that has exited and been reaped.
    fn dead_pid() -> i32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        pid
    }

    fn fake_instance(root: &Path, name: &str, pid: i32, uuid: &str) {
        let dir = root.join(name);
        DirBuilder::new().mode(DIR_MODE).create(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE)).unwrap();
        let info = InstanceInfo {
            pid,
            name: name.into(),
            uuid: uuid.into(),
            start_time: 0,
            proc_start: None,
            qmp: None,
            consoles: Vec::new(),
            version: String::new(),
        };
        fs::write(
            dir.join(INSTANCE_FILE),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(QMP_SOCKET), b"").unwrap();
    }

    #[test]
    fn create_writes_private_dir_and_file_then_cleans_up() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("minivmm");
        let mut inst = Instance::create(&cfg(&root, "web1")).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(inst.dir()), 0o700);
        let file = inst.dir().join(INSTANCE_FILE);
        assert_eq!(mode(&file), 0o600);
        let info: InstanceInfo = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(info.pid, std::process::id() as i32);
        assert_eq!(info.name, "web1");
        validate_uuid(&info.uuid).unwrap();
        assert!(info.proc_start.is_some());
        inst.set_consoles(vec![ConsoleInfo {
            name: "serial0".into(),
            chardev: "c0".into(),
            kind: "pty".into(),
            path: Some("/dev/pts/9".into()),
        }])
        .unwrap();
        assert_eq!(find(&root, "web1").unwrap().consoles.len(), 1);
        let listed = list(&root).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].alive);
        // Same name while alive: refused.
        let e = Instance::create(&cfg(&root, "web1")).unwrap_err();
        assert!(matches!(e, InstanceError::NameInUse { .. }), "{e}");
        // Same uuid under another name: refused.
        let mut c = cfg(&root, "web2");
        c.uuid = Some(info.uuid.to_uppercase());
        assert!(matches!(
            Instance::create(&c).unwrap_err(),
            InstanceError::UuidInUse { .. }
        ));
        let dir = inst.dir().to_path_buf();
        drop(inst);
        assert!(!dir.exists());
        assert!(matches!(
            find(&root, "web1"),
            Err(InstanceError::NotFound(_))
        ));
    }

    #[test]
    fn wrong_owner_or_mode_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("minivmm");
        DirBuilder::new().mode(0o755).create(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let e = Instance::create(&cfg(&root, "a")).unwrap_err();
        assert!(
            matches!(e, InstanceError::WrongMode { mode: 0o755, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("mode 0755, expected 0700"));
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        // An instance directory with a loose mode is refused too.
        let d = root.join("b");
        DirBuilder::new().mode(0o777).create(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            Instance::create(&cfg(&root, "b")).unwrap_err(),
            InstanceError::WrongMode { .. }
        ));
        // A symlink in place of the directory is refused.
        std::os::unix::fs::symlink(t.path(), root.join("c")).unwrap();
        assert!(matches!(
            Instance::create(&cfg(&root, "c")).unwrap_err(),
            InstanceError::NotADirectory(_)
        ));
        // Someone else's directory (root-owned /) fails the owner check unless we are root.
        if sys::euid() != 0 {
            assert!(matches!(
                check_private_dir(Path::new("/")),
                Err(InstanceError::WrongOwner { .. })
            ));
        }
    }

    #[test]
    fn stale_instances_are_listed_removed_and_replaced() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("minivmm");
        ensure_private_dir(&root).unwrap();
        let dead = dead_pid();
        fake_instance(&root, "old", dead, "11111111-2222-4333-8444-555555555555");
        fake_instance(&root, "gone", dead, "21111111-2222-4333-8444-555555555555");
        let live = Instance::create(&cfg(&root, "live")).unwrap();
        let listed = list(&root).unwrap();
        let names: Vec<(&str, bool)> = listed.iter().map(|l| (l.name.as_str(), l.alive)).collect();
        assert_eq!(names, vec![("gone", false), ("live", true), ("old", false)]);
        // A stale directory is taken over, and its uuid is free again.
        let mut c = cfg(&root, "old");
        c.uuid = Some("11111111-2222-4333-8444-555555555555".into());
        let replaced = Instance::create(&c).unwrap();
        assert!(!replaced.dir().join(QMP_SOCKET).exists());
        assert_eq!(remove_stale(&root).unwrap(), vec!["gone".to_string()]);
        assert!(!root.join("gone").exists());
        assert_eq!(list(&root).unwrap().len(), 2);
        drop(live);
        drop(replaced);
        assert!(list(&root).unwrap().is_empty());
    }

    #[test]
    fn names_and_uuids_are_checked() {
        for bad in ["", ".hidden", "a/b", "..", "x y", &"n".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("vm-1.test_2").unwrap();
        for bad in [
            "not-a-uuid",
            "abcdef0123456789abcdef0123456789",
            "{abcdef01-2345-6789-abcd-ef0123456789}",
            "urn:uuid:abcdef01-2345-6789-abcd-ef0123456789",
            "abcdef012-345-6789-abcd-ef0123456789",
            "abcdef01-2345-6789-abcd-ef012345678g",
        ] {
            assert!(validate_uuid(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_uuid("ABCDEF01-2345-6789-ABCD-EF0123456789").unwrap(),
            "abcdef01-2345-6789-abcd-ef0123456789"
        );
        let u = generate_uuid().unwrap();
        validate_uuid(&u).unwrap();
        let parsed = Uuid::try_parse(&u).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(u, generate_uuid().unwrap());
        assert!(proc_start_ticks(std::process::id() as i32).is_some());
        assert!(
            runtime_root().ends_with(APP_DIR)
                || runtime_root().to_string_lossy().contains("minivmm-")
        );
    }
}
