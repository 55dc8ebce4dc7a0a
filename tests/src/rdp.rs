//! Real RDP peers for the RDP tests: Xvfb displays, xrdp (a TLS-security target with a local
//! account), `freerdp-shadow-cli /sec:nla` (an NLA target with a SAM file) and the FreeRDP 2
//! client `xfreerdp`, each bounded and killed when dropped.
//!
//! xrdp runs with its own copy of xrdp.ini (only the `[Globals]` port changed) but shares the
//! machine's sesman port and `/var/log/xrdp.log`, so the tests that use it hold a machine-wide
//! file lock while it runs; freerdp-shadow and the clients run side by side.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, port_open, run_cmd, short_tempdir, wait_child, wait_for, CmdOut};

/// Local unix account xrdp logs in (the vaulted credential of the xrdp target).
pub const XRDP_USER: &str = "psmrdp";
/// Its password.
pub const XRDP_PASSWORD: &str = "Rdp-Target-Pw-815";
/// The account of the freerdp-shadow target (in its SAM file only).
pub const SHADOW_USER: &str = "psmshadow";
/// Its password.
pub const SHADOW_PASSWORD: &str = "Shad0w-Pass";

/// The RDP tools the tests need (Debian: xrdp xorgxrdp freerdp2-x11 freerdp2-shadow-x11
/// winpr-utils xvfb xdotool ffmpeg x11-apps).
pub const RDP_TOOLS: [&str; 9] = [
    "/usr/sbin/xrdp",
    "/usr/sbin/xrdp-sesman",
    "/usr/bin/xfreerdp",
    "/usr/bin/freerdp-shadow-cli",
    "/usr/bin/winpr-hash",
    "/usr/bin/Xvfb",
    "/usr/bin/xdotool",
    "/usr/bin/ffmpeg",
    "/usr/bin/xlogo",
];

/// Panics with what to install when a tool is missing (scripts/test.sh installs them).
pub fn require_rdp_tools() {
    let missing: Vec<&str> = RDP_TOOLS
        .iter()
        .copied()
        .filter(|t| !Path::new(t).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "RDP tools missing: {missing:?}; run scripts/test.sh as root (it installs xrdp xorgxrdp freerdp2-x11 freerdp2-shadow-x11 winpr-utils xvfb xdotool ffmpeg x11-apps)"
    );
}

fn kill_child(child: &mut Child) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if wait_child(child, Duration::from_secs(3)).is_none() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let out = fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// A virtual X display.
pub struct Xvfb {
    child: Child,
    display: u32,
    width: u32,
    height: u32,
    _dir: TempDir,
}

impl Xvfb {
    /// Starts `Xvfb` on a free display number with a `width`x`height`x24 screen.
    pub fn start(width: u32, height: u32) -> Xvfb {
        let dir = short_tempdir("xvfb");
        for _ in 0..50 {
            let display = 200 + (rand_u32() % 700);
            if Path::new(&format!("/tmp/.X{display}-lock")).exists()
                || Path::new(&format!("/tmp/.X11-unix/X{display}")).exists()
            {
                continue;
            }
            let log = dir.path().join("xvfb.log");
            let mut child = spawn_logged(
                Command::new("timeout")
                    .arg("1800")
                    .arg("Xvfb")
                    .arg(format!(":{display}"))
                    .args(["-screen", "0", &format!("{width}x{height}x24")])
                    .args(["-nolisten", "tcp", "-noreset"]),
                &log,
            );
            let sock = PathBuf::from(format!("/tmp/.X11-unix/X{display}"));
            let up = wait_for(Duration::from_secs(10), || {
                sock.exists() || matches!(child.try_wait(), Ok(Some(_)))
            });
            if up && sock.exists() {
                return Xvfb {
                    child,
                    display,
                    width,
                    height,
                    _dir: dir,
                };
            }
            kill_child(&mut child);
        }
        panic!("no free X display for Xvfb");
    }

    /// `:N`.
    pub fn display(&self) -> String {
        format!(":{}", self.display)
    }

    /// The screen as RGBA bytes (`width * height * 4`), captured with ffmpeg's x11grab.
    pub fn screenshot(&self) -> Vec<u8> {
        let out = run_cmd(
            Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-f", "x11grab"])
                .args(["-video_size", &format!("{}x{}", self.width, self.height)])
                .args(["-i", &self.display(), "-frames:v", "1"])
                .args(["-f", "rawvideo", "-pix_fmt", "rgba", "-"]),
            None,
            Duration::from_secs(30),
        );
        assert!(out.success(), "screenshot failed: {}", out.describe());
        assert_eq!(
            out.stdout.len(),
            (self.width * self.height * 4) as usize,
            "screenshot size"
        );
        out.stdout
    }

    /// Width and height of the screen.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b)
}

/// Decodes a PNG (or any image ffmpeg reads) to RGBA bytes and its size.
pub fn decode_image(path: &Path) -> (u32, u32, Vec<u8>) {
    let probe = run_cmd(
        Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v:0"])
            .args(["-show_entries", "stream=width,height", "-of", "csv=p=0"])
            .arg(path),
        None,
        Duration::from_secs(30),
    );
    assert!(
        probe.success(),
        "ffprobe {}: {}",
        path.display(),
        probe.describe()
    );
    let dims = probe.stdout_str();
    let mut it = dims.trim().split(',');
    let w: u32 = it.next().and_then(|s| s.parse().ok()).expect("width");
    let h: u32 = it.next().and_then(|s| s.parse().ok()).expect("height");
    let out = run_cmd(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-i"])
            .arg(path)
            .args(["-f", "rawvideo", "-pix_fmt", "rgba", "-"]),
        None,
        Duration::from_secs(30),
    );
    assert!(
        out.success(),
        "decode {}: {}",
        path.display(),
        out.describe()
    );
    (w, h, out.stdout)
}

/// Share of pixels (0.0–1.0) whose RGB differ by more than `tolerance` in any channel, over
/// the top-left `w`x`h` area both images have.
pub fn pixel_difference(a: (u32, u32, &[u8]), b: (u32, u32, &[u8]), tolerance: u8) -> f64 {
    let w = a.0.min(b.0) as usize;
    let h = a.1.min(b.1) as usize;
    let mut differ = 0usize;
    for y in 0..h {
        for x in 0..w {
            let pa = (y * a.0 as usize + x) * 4;
            let pb = (y * b.0 as usize + x) * 4;
            if (0..3).any(|c| a.2[pa + c].abs_diff(b.2[pb + c]) > tolerance) {
                differ += 1;
            }
        }
    }
    differ as f64 / (w * h).max(1) as f64
}

/// Share of pixels that are (nearly) white and (nearly) black: xlogo's picture is a black X
/// on white, the gateway's or a login dialog's are not.
pub fn black_white_share(rgba: &[u8]) -> (f64, f64) {
    let n = (rgba.len() / 4).max(1) as f64;
    let mut white = 0usize;
    let mut black = 0usize;
    for p in rgba.chunks_exact(4) {
        if p[..3].iter().all(|&c| c > 230) {
            white += 1;
        } else if p[..3].iter().all(|&c| c < 25) {
            black += 1;
        }
    }
    (white as f64 / n, black as f64 / n)
}

/// Makes sure the local account xrdp logs in exists, with a session that shows xlogo.
pub fn ensure_xrdp_user() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let script = format!(
            "id -u {u} >/dev/null 2>&1 || useradd -m -s /bin/bash {u} || id -u {u} >/dev/null; \
             echo '{u}:{p}' | chpasswd && usermod -U {u} >/dev/null 2>&1; \
             printf '#!/bin/sh\\nexec xlogo -geometry 1024x768+0+0\\n' > ~{u}/.xsession; \
             chmod 755 ~{u}/.xsession; chown {u}: ~{u}/.xsession; true",
            u = XRDP_USER,
            p = XRDP_PASSWORD
        );
        let out = run_cmd(
            Command::new("flock").args(["/tmp/psm-tests-user.lock", "sh", "-c", &script]),
            None,
            Duration::from_secs(60),
        );
        assert!(
            out.success(),
            "cannot set up {XRDP_USER}: {}",
            out.describe()
        );
    });
}

/// xrdp (TLS security, no NLA) on 127.0.0.1, with the machine's sesman. Holds the machine-wide
/// xrdp lock while it lives.
pub struct Xrdp {
    sesman: Child,
    xrdp: Child,
    port: u16,
    log_start: u64,
    _lock: fs::File,
    dir: TempDir,
}

const XRDP_LOG: &str = "/var/log/xrdp.log";

impl Xrdp {
    /// Starts xrdp-sesman and xrdp (waits for the machine-wide lock first).
    pub fn start() -> Xrdp {
        require_rdp_tools();
        ensure_xrdp_user();
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/psm-tests-xrdp.lock")
            .expect("xrdp lock file");
        lock.lock().expect("xrdp lock");
        // a previous run's session of the same user would be reattached: start clean
        let _ = run_cmd(
            Command::new("pkill").args(["-KILL", "-u", XRDP_USER]),
            None,
            Duration::from_secs(10),
        );
        let _ = run_cmd(
            Command::new("pkill").args(["-KILL", "-x", "xrdp-sesman"]),
            None,
            Duration::from_secs(10),
        );
        let _ = run_cmd(
            Command::new("pkill").args(["-KILL", "-x", "xrdp"]),
            None,
            Duration::from_secs(10),
        );
        for pid in ["/run/xrdp/xrdp.pid", "/run/xrdp/xrdp-sesman.pid"] {
            let _ = fs::remove_file(pid);
        }
        fs::create_dir_all("/run/xrdp/sockdir").expect("/run/xrdp/sockdir");
        let _ = fs::set_permissions("/run/xrdp/sockdir", fs::Permissions::from_mode(0o1777));
        let dir = short_tempdir("xrdp");
        let port = free_port();
        let ini = fs::read_to_string("/etc/xrdp/xrdp.ini").expect("/etc/xrdp/xrdp.ini");
        // only the [Globals] port: the session sections keep port=-1
        let ini = ini.replacen("\nport=3389", &format!("\nport=tcp://127.0.0.1:{port}"), 1);
        assert!(
            ini.contains(&format!("tcp://127.0.0.1:{port}")),
            "xrdp.ini has no port=3389"
        );
        let ini_path = dir.path().join("xrdp.ini");
        fs::write(&ini_path, ini).expect("xrdp.ini");
        let log_start = fs::metadata(XRDP_LOG).map(|m| m.len()).unwrap_or(0);
        let sesman = spawn_logged(
            Command::new("timeout").args(["1800", "xrdp-sesman", "-n"]),
            &dir.path().join("sesman.out"),
        );
        let up = wait_for(Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", 3350)).is_ok()
                || std::net::TcpStream::connect(("::1", 3350)).is_ok()
        });
        assert!(up, "xrdp-sesman did not listen on 3350 within 15 s");
        let xrdp = spawn_logged(
            Command::new("timeout")
                .args(["1800", "xrdp", "-n", "-c"])
                .arg(&ini_path),
            &dir.path().join("xrdp.out"),
        );
        let up = wait_for(Duration::from_secs(15), || port_open(port));
        assert!(up, "xrdp did not listen on {port} within 15 s");
        Xrdp {
            sesman,
            xrdp,
            port,
            log_start,
            _lock: lock,
            dir,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What xrdp logged since it started.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(XRDP_LOG) {
            let _ = f.seek(SeekFrom::Start(self.log_start));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until xrdp's log says `user` logged in.
    pub fn wait_login(&self, user: &str, timeout: Duration) -> bool {
        let needle = format!("login successful for user {user}");
        wait_for(timeout, || self.log().contains(&needle))
    }

    /// Scratch directory of this xrdp.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Xrdp {
    fn drop(&mut self) {
        kill_child(&mut self.xrdp);
        kill_child(&mut self.sesman);
        let _ = run_cmd(
            Command::new("pkill").args(["-KILL", "-u", XRDP_USER]),
            None,
            Duration::from_secs(10),
        );
    }
}

/// `freerdp-shadow-cli /sec:nla` sharing an Xvfb display that shows xlogo; the account is
/// [`SHADOW_USER`] in its own SAM file.
pub struct Shadow {
    shadow: Child,
    xlogo: Child,
    display: Xvfb,
    port: u16,
    dir: TempDir,
}

impl Shadow {
    /// Starts the display, xlogo on it and the shadow server.
    pub fn start() -> Shadow {
        require_rdp_tools();
        let dir = short_tempdir("shadow");
        let display = Xvfb::start(1024, 768);
        let xlogo = spawn_logged(
            Command::new("timeout")
                .args(["1800", "xlogo", "-geometry", "1024x768+0+0"])
                .env("DISPLAY", display.display()),
            &dir.path().join("xlogo.log"),
        );
        let sam = dir.path().join("shadow.sam");
        let out = run_cmd(
            Command::new("winpr-hash").args([
                "-u",
                SHADOW_USER,
                "-p",
                SHADOW_PASSWORD,
                "-f",
                "sam",
            ]),
            None,
            Duration::from_secs(10),
        );
        assert!(out.success(), "winpr-hash: {}", out.describe());
        fs::write(&sam, out.stdout).expect("sam file");
        let port = free_port();
        let shadow = spawn_logged(
            Command::new("timeout")
                .arg("1800")
                .arg("freerdp-shadow-cli")
                .arg(format!("/port:{port}"))
                .args(["/bind-address:127.0.0.1", "/sec:nla"])
                .arg(format!("/sam-file:{}", sam.display()))
                .env("DISPLAY", display.display()),
            &dir.path().join("shadow.log"),
        );
        let up = wait_for(Duration::from_secs(15), || port_open(port));
        assert!(
            up,
            "freerdp-shadow-cli did not listen within 15 s: {}",
            fs::read_to_string(dir.path().join("shadow.log")).unwrap_or_default()
        );
        Shadow {
            shadow,
            xlogo,
            display,
            port,
            dir,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The shadowed display.
    pub fn display(&self) -> &Xvfb {
        &self.display
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("shadow.log")).unwrap_or_default()
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        kill_child(&mut self.shadow);
        kill_child(&mut self.xlogo);
    }
}

/// The FreeRDP 2 client on a display of its own.
pub struct FreeRdp {
    child: Child,
    display: Xvfb,
    log: PathBuf,
    _dir: TempDir,
}

impl FreeRdp {
    /// Starts `xfreerdp /v:ADDR /u:USER /p:PASSWORD /cert:ignore /size:1024x768` plus `extra`
    /// on a 1024x768 display.
    pub fn start(address: &str, user: &str, password: &str, extra: &[&str]) -> FreeRdp {
        require_rdp_tools();
        let dir = short_tempdir("xfreerdp");
        let display = Xvfb::start(1024, 768);
        let log = dir.path().join("xfreerdp.log");
        let child = spawn_logged(
            Command::new("timeout")
                .arg("300")
                .arg("xfreerdp")
                .arg(format!("/v:{address}"))
                .arg(format!("/u:{user}"))
                .arg(format!("/p:{password}"))
                .args(["/cert:ignore", "/size:1024x768", "-wallpaper", "/bpp:32"])
                .args(extra)
                .env("DISPLAY", display.display())
                .env("HOME", dir.path()),
            &log,
        );
        FreeRdp {
            child,
            display,
            log,
            _dir: dir,
        }
    }

    /// The client's display.
    pub fn display(&self) -> &Xvfb {
        &self.display
    }

    /// Waits for the client to exit; its exit code (None: still running at the timeout).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout).map(|s| s.code().unwrap_or(-1))
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it printed.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Types `text` into the client's window (xdotool on its display).
    pub fn type_text(&self, text: &str) -> CmdOut {
        run_cmd(
            Command::new("xdotool")
                .args(["type", "--delay", "60", text])
                .env("DISPLAY", self.display.display()),
            None,
            Duration::from_secs(60),
        )
    }

    /// Presses one key (`Return`, `ctrl+c`…) in the client's window.
    pub fn key(&self, key: &str) -> CmdOut {
        run_cmd(
            Command::new("xdotool")
                .args(["key", key])
                .env("DISPLAY", self.display.display()),
            None,
            Duration::from_secs(30),
        )
    }

    /// Waits until the client's screen satisfies `cond` (checked on fresh screenshots).
    pub fn wait_screen(&self, timeout: Duration, mut cond: impl FnMut(&[u8]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if cond(&self.display.screenshot()) {
                return true;
            }
            thread::sleep(Duration::from_millis(300));
        }
        false
    }
}

impl Drop for FreeRdp {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Whether the screen shows xlogo (mostly white with a large black X).
pub fn shows_xlogo(rgba: &[u8]) -> bool {
    let (white, black) = black_white_share(rgba);
    white > 0.4 && black > 0.05
}
