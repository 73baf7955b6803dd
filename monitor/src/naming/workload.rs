//! Which workload a socket belongs to: its cgroup, named as an operator names it.
//!
//! The kernel program reports a socket's cgroup v2 id (`StateEvent::cgroup_id`), which is
//! the inode number of the cgroup's directory in the cgroup2 filesystem (`kernfs_node.id`,
//! `cgroup_id()` in include/linux/cgroup.h). [`Workloads`] finds that directory by walking
//! the cgroup2 mount, once per cgroup it has not seen (never per event), and names the
//! workload from the path with [`workload_name`]: a Kubernetes pod, a container, a systemd
//! unit, or the path itself.
//!
//! The walk needs the host's cgroup2 tree: in a container, mount it (the DaemonSet does) and
//! run in the host's cgroup namespace, or every workload is `unknown`.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The name of the root cgroup: everything not in a cgroup of its own.
pub const HOST: &str = "host";
/// The name of a cgroup that could not be found (not read, or gone before it was looked up).
pub const UNKNOWN: &str = "unknown";
/// Where the kubelet keeps one directory per pod, `<namespace>_<pod>_<uid>`.
pub const DEFAULT_POD_LOGS: &str = "/var/log/pods";

/// Most cgroup names remembered; beyond it, the names of cgroups that vanished go first.
const MAX_NAMES: usize = 16_384;
/// Most directories one walk of the cgroup2 tree visits (a host has hundreds to thousands).
const MAX_WALK: usize = 262_144;
/// How long a cgroup id the walk did not find is answered `unknown` without another walk.
const MISSING_RETRY: Duration = Duration::from_secs(5);

/// The cgroup2 mount point in a `/proc/self/mountinfo` text: `/sys/fs/cgroup/unified` on
/// hybrid hosts (like ours), `/sys/fs/cgroup` on pure cgroup v2 hosts.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (mount, rest) = line.split_once(" - ")?;
        (rest.split(' ').next()? == "cgroup2")
            .then(|| mount.split(' ').nth(4).map(unescape_mount_path))?
    })
}

/// Mount points escape space, tab, newline and backslash as `\ooo` (`show_mountinfo()` →
/// `seq_path_root()` with " \t\n\\").
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let octal = bytes.get(at + 1..at + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[at], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                at += 4;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Longest label value: a longer name keeps a readable prefix and a hash of the whole.
pub const MAX_NAME_BYTES: usize = 128;

/// The workload of a cgroup, from its path relative to the cgroup2 root (`""` for the root).
///
/// Only the structure that root and systemd make is believed: the path is read from the root
/// down through slices (`*.slice`), and the first thing below them names the workload. What
/// lies deeper is a delegated subtree (a user manager's, a container's), where anyone with
/// that delegation can create cgroups with any name, so it never decides the name:
/// - the kubelet's tree (`kubepods…`, reached through slices, or the cgroupfs driver's
///   `kubepods/<qos>`): its first (outermost) pod, `namespace/pod` when `pod_name` knows
///   the UID, else `pod/<uid>`; a pod nested in another pod's container is the outer pod;
/// - a user manager (`user@UID.service`): `user@UID.service`, or `user@UID.service/x.service`
///   for the first unit it runs (through its own slices); nothing below it is named as a pod,
///   a container or a system unit;
/// - a container scope (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
///   `libpod-<id>.scope`): `container/<first 12 hex digits>`;
/// - a systemd service (`…/nginx.service`): `nginx.service`;
/// - otherwise the path (`/user.slice/user-0.slice/session-3.scope`), and [`HOST`] for the
///   root.
///
/// Every name is at most [`MAX_NAME_BYTES`] ([`bounded`]).
pub fn workload_name(path: &str, pod_name: impl Fn(&str) -> Option<String>) -> String {
    bounded(unbounded_name(path, pod_name))
}

fn unbounded_name(path: &str, pod_name: impl Fn(&str) -> Option<String>) -> String {
    let path = path.trim_matches('/');
    if path.is_empty() {
        return HOST.to_owned();
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut in_kubepods = false;
    for (at, segment) in segments.iter().enumerate() {
        in_kubepods |= segment.starts_with("kubepods");
        if in_kubepods {
            if let Some(uid) = pod_uid(segment) {
                return pod_name(&uid).unwrap_or_else(|| format!("pod/{uid}"));
            }
            // The cgroupfs driver's levels above the pods.
            if ["kubepods", "besteffort", "burstable", "guaranteed"].contains(segment) {
                continue;
            }
        }
        if segment.ends_with(".slice") {
            continue;
        }
        if is_user_manager(segment) {
            return match first_unit(&segments[at + 1..]) {
                Some(unit) => format!("{segment}/{unit}"),
                None => (*segment).to_owned(),
            };
        }
        if let Some(id) = container_id(segment) {
            return format!("container/{}", &id[..12]);
        }
        if segment.ends_with(".service") {
            return (*segment).to_owned();
        }
        break;
    }
    format!("/{path}")
}

/// `user@<uid>.service`: a user's systemd instance, whose subtree is delegated to the user.
fn is_user_manager(segment: &str) -> bool {
    segment
        .strip_prefix("user@")
        .and_then(|rest| rest.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// The first service below `segments`' slices, if that is what comes first.
fn first_unit<'a>(segments: &[&'a str]) -> Option<&'a str> {
    let unit = segments.iter().find(|segment| !segment.ends_with(".slice"))?;
    unit.ends_with(".service").then_some(*unit)
}

/// `name` if it is at most [`MAX_NAME_BYTES`] long; else its first bytes (at a character
/// boundary), `~`, and 16 hex digits of a hash of the whole name, so two long names never
/// share a value (FNV-1a, 64 bits: no key, the same on every host).
pub fn bounded(name: String) -> String {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut cut = MAX_NAME_BYTES - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &name[..cut])
}

/// The pod UID in a kubepods path segment: `pod<uid>` (cgroupfs driver) or
/// `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd driver).
fn pod_uid(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".slice").unwrap_or(segment);
    let (_, uid) = segment.rsplit_once("pod")?;
    let looks_like_uid =
        uid.len() >= 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    looks_like_uid.then(|| uid.replace('_', "-"))
}

/// The container id in a runtime's scope name, at least 12 hex digits.
fn container_id(segment: &str) -> Option<&str> {
    let scope = segment.strip_suffix(".scope")?;
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|prefix| scope.strip_prefix(prefix))?;
    (id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Pod UID → `namespace/pod`, from the kubelet's log directories `<namespace>_<pod>_<uid>`
/// (namespace and pod names cannot contain `_`).
pub fn pod_names(pod_logs: &Path) -> HashMap<String, String> {
    let entries = fs::read_dir(pod_logs).into_iter().flatten().flatten();
    entries
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let mut parts = name.splitn(3, '_');
            let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
            Some((uid.to_owned(), format!("{namespace}/{pod}")))
        })
        .collect()
}

/// The cgroup v2 id of a process (the inode of its cgroup's directory), from the `0::PATH`
/// line of `/proc/PID/cgroup`; 0 when unknown.
pub fn cgroup_id_of(mount: &Path, pid: u32) -> u64 {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return 0 };
    let Some(path) = text.lines().find_map(|line| line.strip_prefix("0::")) else { return 0 };
    let directory = mount.join(path.trim_start_matches('/'));
    fs::metadata(directory).map_or(0, |meta| meta.ino())
}

/// A name, its cgroup's path under the mount, and whether the last walk still found it.
#[derive(Debug)]
struct Name {
    name: Box<str>,
    path: Box<str>,
    present: bool,
}

/// Cgroup id → workload name, cached and bounded.
#[derive(Debug)]
pub struct Workloads {
    /// The cgroup2 mount; `None`: every workload is [`UNKNOWN`].
    mount: Option<PathBuf>,
    pod_logs: PathBuf,
    names: HashMap<u64, Name>,
    /// Ids the last walks did not find, and when.
    missing: HashMap<u64, Instant>,
    walks: u64,
}

impl Workloads {
    /// Names cgroups under `mount`, pods by the directories in `pod_logs`.
    pub fn new(mount: Option<PathBuf>, pod_logs: PathBuf) -> Self {
        Workloads { mount, pod_logs, names: HashMap::new(), missing: HashMap::new(), walks: 0 }
    }

    /// Finds this host's cgroup2 mount in `/proc/self/mountinfo`.
    pub fn discover(pod_logs: PathBuf) -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Workloads::new(cgroup2_mount(&mountinfo), pod_logs)
    }

    /// Where the cgroup2 tree is mounted, if anywhere.
    pub fn mount(&self) -> Option<&Path> {
        self.mount.as_deref()
    }

    /// How many times the cgroup2 tree was walked.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// The workload name of cgroup `id` (0: [`UNKNOWN`]). A hash lookup, except the first time
    /// an id is seen: then one walk of the cgroup2 tree names every cgroup on the host.
    pub fn name(&mut self, id: u64) -> &str {
        if id != 0 && !self.names.contains_key(&id) {
            let recently_missing =
                self.missing.get(&id).is_some_and(|since| since.elapsed() < MISSING_RETRY);
            if !recently_missing {
                self.walk();
            }
            // Only a walk that did not find it starts its wait; asking again meanwhile
            // must not push the next walk further away.
            if !recently_missing && !self.names.contains_key(&id) {
                if self.missing.len() >= MAX_NAMES {
                    self.missing.clear();
                }
                self.missing.insert(id, Instant::now());
            }
        }
        self.names.get(&id).map_or(UNKNOWN, |known| &known.name)
    }

    /// Whether cgroup `id` still exists (one `stat`; false for an id never named).
    pub fn exists(&self, id: u64) -> bool {
        let (Some(mount), Some(known)) = (&self.mount, self.names.get(&id)) else {
            return false;
        };
        fs::metadata(mount.join(&*known.path)).is_ok_and(|meta| meta.ino() == id)
    }

    /// Walks the cgroup2 tree and names every cgroup in it. Names of cgroups that vanished
    /// are kept for one more walk (their last sockets may still close), then forgotten.
    fn walk(&mut self) {
        let Some(mount) = self.mount.clone() else { return };
        self.walks += 1;
        let pods = pod_names(&self.pod_logs);
        let found = cgroup_directories(&mount);
        self.names.retain(|id, known| {
            let keep = known.present || found.contains_key(id);
            known.present = false;
            keep
        });
        for (id, path) in found {
            if self.names.len() >= MAX_NAMES && !self.names.contains_key(&id) {
                continue;
            }
            let name = self.names.entry(id).or_insert_with(|| Name {
                name: workload_name(&path, |uid| pods.get(uid).cloned()).into(),
                path: path.as_str().into(),
                present: true,
            });
            name.present = true;
            self.missing.remove(&id);
        }
    }
}

/// Every directory under `mount` (inode → path relative to it), up to [`MAX_WALK`].
fn cgroup_directories(mount: &Path) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut pending = vec![String::new()];
    while let Some(relative) = pending.pop() {
        let directory = mount.join(&relative);
        let Ok(meta) = fs::metadata(&directory) else { continue };
        found.insert(meta.ino(), relative.clone());
        if found.len() >= MAX_WALK {
            break;
        }
        let Ok(entries) = fs::read_dir(&directory) else { continue };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
            if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                pending.push(if relative.is_empty() {
                    name.to_owned()
                } else {
                    format!("{relative}/{name}")
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_UID: &str = "8a5c7f4e-3b1d-4c2a-9e6f-0123456789ab";
    const CONTAINER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn name(path: &str) -> String {
        workload_name(path, |uid| (uid == POD_UID).then(|| "shop/web-7d9f".to_owned()))
    }

    #[test]
    fn names_go_from_most_to_least_specific() {
        let systemd_pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             cri-containerd-{CONTAINER}.scope",
            POD_UID.replace('-', "_")
        );
        assert_eq!(name(&systemd_pod), "shop/web-7d9f");
        let cgroupfs_pod = format!("/kubepods/besteffort/pod{POD_UID}/{CONTAINER}");
        assert_eq!(name(&cgroupfs_pod), "shop/web-7d9f");
        let unknown_pod = "kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice";
        assert_eq!(name(unknown_pod), "pod/11111111-2222-3333-4444-555555555555");
        for runtime in ["docker", "cri-containerd", "crio", "libpod"] {
            let scope = format!("system.slice/{runtime}-{CONTAINER}.scope");
            assert_eq!(name(&scope), "container/0123456789ab", "{runtime}");
        }
        assert_eq!(name("/system.slice/nginx.service"), "nginx.service");
        assert_eq!(name("tcpmon-test.slice/web.service"), "web.service");
        assert_eq!(name("system.slice/nginx.service/worker"), "nginx.service");
        assert_eq!(
            name("user.slice/user-0.slice/session-3.scope"),
            "/user.slice/user-0.slice/session-3.scope"
        );
        assert_eq!(name("libpod-short.scope"), "/libpod-short.scope", "not a container id");
        assert_eq!(name(""), HOST);
        assert_eq!(name("/"), HOST);
    }

    #[test]
    fn names_nobody_can_spoof_come_from_the_outermost_structure_root_made() {
        let uid = POD_UID.replace('-', "_");
        let scope = format!("cri-containerd-{CONTAINER}.scope");
        // A user's delegated subtree dressed as a pod: named after the user manager.
        let in_user = format!(
            "user.slice/user-4242.slice/user@4242.service/app.slice/kubepods-besteffort-pod{uid}.slice/{scope}"
        );
        assert_eq!(name(&in_user), "user@4242.service");
        assert_eq!(
            name("user.slice/user-1000.slice/user@1000.service/app.slice/app.service"),
            "user@1000.service/app.service"
        );
        assert_eq!(
            name("user.slice/user-1000.slice/user@1000.service/x/nginx.service"),
            "user@1000.service",
            "a service in a plain directory of the user's is not the user's unit"
        );
        assert_eq!(
            name(&format!("user.slice/user-1000.slice/user@1000.service/docker-{CONTAINER}.scope")),
            "user@1000.service"
        );
        // A pod nested in another pod's container is the outer pod.
        let nested = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/{scope}/\
             kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/{CONTAINER}"
        );
        assert_eq!(name(&nested), "shop/web-7d9f");
        // A pod-like name outside the kubelet's tree is no pod.
        assert_eq!(
            name("evil/pod11111111-2222-3333-4444-555555555555"),
            "/evil/pod11111111-2222-3333-4444-555555555555"
        );
        // Units only from the slice structure: a service nested in another's subtree is the
        // outer one; a .service name in a plain directory is a path.
        assert_eq!(name("system.slice/docker.service/evil/nginx.service"), "docker.service");
        assert_eq!(name("evil/nginx.service"), "/evil/nginx.service");
        assert_eq!(
            name(&format!("system.slice/runner.service/docker-{CONTAINER}.scope")),
            "runner.service"
        );
    }

    #[test]
    fn long_names_keep_a_prefix_and_a_hash_and_never_collide() {
        let long = |tail: &str| name(&format!("system.slice/{}{tail}.service", "a".repeat(200)));
        let (one, two) = (long("1"), long("2"));
        assert!(one.len() <= MAX_NAME_BYTES && two.len() <= MAX_NAME_BYTES, "{one}");
        assert_ne!(one, two);
        assert!(one.starts_with("aaaa") && one.contains('~'), "{one}");
        assert_eq!(one, long("1"), "the same name every time");
        // Multi-byte characters are cut at a boundary.
        let wide = bounded("é".repeat(100));
        assert!(wide.len() <= MAX_NAME_BYTES && wide.starts_with("éé"), "{wide}");
        assert_eq!(bounded("short".into()), "short");
    }

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_pure_hosts() {
        let hybrid = "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = "35 24 0:30 / /mnt/cgroup\\040two rw - cgroup2 none rw";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/mnt/cgroup two")));
        assert_eq!(
            cgroup2_mount("41 31 0:38 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"),
            None
        );
        assert_eq!(cgroup2_mount("garbage"), None);
    }

    #[test]
    fn pod_names_come_from_the_kubelet_log_directories() {
        let root = std::env::temp_dir().join(format!("tcpmon-pods-{}", std::process::id()));
        fs::create_dir_all(root.join(format!("shop_web-7d9f_{POD_UID}"))).unwrap();
        fs::create_dir_all(root.join("not-a-pod")).unwrap();
        let names = pod_names(&root);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(names.len(), 1);
        assert_eq!(names[POD_UID], "shop/web-7d9f");
    }

    #[test]
    fn a_tree_is_walked_once_per_new_cgroup_and_vanished_ones_are_forgotten() {
        let root = std::env::temp_dir().join(format!("tcpmon-cgroups-{}", std::process::id()));
        let web = root.join("tcpmon-test.slice/web.service");
        fs::create_dir_all(&web).unwrap();
        let inode = |path: &Path| fs::metadata(path).unwrap().ino();
        let mut workloads = Workloads::new(Some(root.clone()), root.join("no-pods"));
        assert_eq!(workloads.name(inode(&web)), "web.service");
        assert_eq!(workloads.name(inode(&root)), HOST);
        assert_eq!(workloads.name(0), UNKNOWN);
        assert_eq!(workloads.walks(), 1, "one walk named them all");
        assert_eq!(workloads.name(u64::MAX), UNKNOWN);
        assert_eq!(workloads.name(u64::MAX), UNKNOWN);
        assert_eq!(workloads.walks(), 2, "a missing id is not looked for again at once");
        // (Created before the removal: a file system may reuse a freed inode at once.)
        let (web_id, db) = (inode(&web), root.join("db"));
        fs::create_dir(&db).unwrap();
        fs::remove_dir(&web).unwrap();
        assert_eq!(workloads.name(inode(&db)), "/db");
        assert_eq!(workloads.name(web_id), "web.service", "kept for one more walk");
        workloads.name(u64::MAX - 1);
        assert_eq!(workloads.walks(), 4);
        assert!(!workloads.names.contains_key(&web_id), "forgotten after two walks");
        fs::remove_dir_all(&root).unwrap();
        let mut without = Workloads::new(None, PathBuf::new());
        assert_eq!(without.name(5), UNKNOWN);
        assert_eq!(without.walks(), 0);
    }
}
