//! Least privilege, for real: after start-up no thread of the daemon holds a capability but
//! its kernel-reader thread, which keeps CAP_SYS_ADMIN only (to enter network namespaces), and
//! everything a user does still works: scrapes, the kernel state of a namespace the daemon
//! must enter, a tail, and a SIGHUP reload. Needs root, like the other kernel tests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::{
    assert_least_privilege, in_namespace, in_netns, kernel_tests_enabled, thread_capabilities_in,
    Daemon, NetnsTest, CAP_SYS_ADMIN,
};

#[test]
fn after_start_up_only_the_kernel_reader_keeps_cap_sys_admin_and_everything_still_works() {
    let _host = common::shared(); // its own namespaces only
    if !kernel_tests_enabled() {
        return;
    }
    let test = NetnsTest::new("caps", 8092);
    let config = std::env::temp_dir().join(format!("tcpmon-caps-{}.toml", std::process::id()));
    std::fs::write(&config, "log-level = \"info\"\n").unwrap();
    let mut daemon =
        Daemon::start(&["--config", config.to_str().unwrap(), "--netns-labels", "100000"]);
    let proc = std::path::Path::new("/proc");
    assert_least_privilege(&thread_capabilities_in(proc, daemon.pid()), &[CAP_SYS_ADMIN]);
    assert!(
        daemon.stderr_so_far().contains("the kernel-reader thread keeps CAP_SYS_ADMIN"),
        "{}",
        daemon.stderr_so_far()
    );

    // A tail, then one connection in the pair's namespaces, which the tail must show.
    let tail = test.tail(&daemon, &["--count", "1"]);
    let server = test.server();
    let listener = test.listener;
    let accepted = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
    });
    in_netns(&test.pair.client, || {
        let mut stream = TcpStream::connect(server).unwrap();
        stream.write_all(b"x").unwrap();
    });
    accepted.join().unwrap();
    let records = tail.finish();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].contains(&format!(":{}", test.port)), "{records:?}");

    // The kernel state of the server's namespace, which only setns() reaches: its own TcpExt
    // series, and no read error.
    let inode = common::NetnsPair::inode(&test.pair.server);
    let scrape = daemon.settled_scrape();
    let series = in_namespace("tcpmon_listen_overflows_total", inode, "");
    let series = series.replace(",}", "}");
    assert!(scrape.contains_key(&series), "no {series}: the namespace was not read");
    assert_eq!(scrape.get("tcpmon_kernel_state_read_errors_total"), Some(&0.0));
    assert_eq!(scrape.get("tcpmon_kernel_map_read_errors_total"), Some(&0.0));

    // A reload applies.
    std::fs::write(&config, "log-level = \"debug\"\n").unwrap();
    daemon.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(500));
    // Nothing regained a capability on the way.
    assert_least_privilege(&thread_capabilities_in(proc, daemon.pid()), &[CAP_SYS_ADMIN]);
    let (status, stderr, _) = daemon.stop();
    std::fs::remove_file(&config).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("log level INFO -> DEBUG"), "{stderr}");
}
