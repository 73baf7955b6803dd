//! `tcpmon tail`: connects to the daemon's tail socket (or, when no daemon runs, runs the
//! pipeline in-process), and prints records as aligned columns or JSON lines.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::filter::{Subscribe, View};
use super::format;
use super::hub::{ClientQueue, NewSubscriber};
use super::record::TailRecord;

/// What `tcpmon tail` was asked for (cli.rs builds it from the command line).
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// The daemon's tail socket.
    pub socket: PathBuf,
    /// What to receive.
    pub request: Subscribe,
    /// One JSON object per line instead of columns.
    pub json: bool,
    /// Exit after this many records.
    pub count: Option<u64>,
    /// Never colour the output.
    pub no_color: bool,
}

/// Where lines come from.
enum Lines {
    Daemon(BufReader<UnixStream>),
    InProcess {
        queue: ClientQueue,
        /// What is left of the last chunk.
        rest: Bytes,
    },
}

impl Lines {
    /// Reads the next line, its `\n` included, into `line`; false at the end of the stream.
    async fn next(&mut self, line: &mut Vec<u8>) -> std::io::Result<bool> {
        line.clear();
        match self {
            Lines::Daemon(reader) => Ok(reader.read_until(b'\n', line).await? > 0),
            Lines::InProcess { queue, rest } => {
                if rest.is_empty() {
                    let Some(chunk) = queue.chunks.recv().await else { return Ok(false) };
                    queue.backlog.written(chunk.records);
                    *rest = chunk.lines;
                }
                let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |at| at + 1);
                line.extend_from_slice(&rest.split_to(end));
                Ok(true)
            }
        }
    }

    /// Whether another line can be had without waiting: until then, what was printed can
    /// stay in the output buffer (one write for many lines under load).
    fn has_more(&self) -> bool {
        match self {
            Lines::Daemon(reader) => !reader.buffer().is_empty(),
            Lines::InProcess { queue, rest } => !rest.is_empty() || !queue.chunks.is_empty(),
        }
    }
}

/// Why printing stopped.
enum End {
    /// `--count` reached, SIGINT, or stdout closed: a normal end.
    Done,
    /// The stream ended or failed.
    Failed(String),
}

/// Runs the tail; returns the process exit code. When no daemon answers on the socket,
/// `standalone` runs the pipeline in this process for the one client it is given.
pub async fn run<F>(args: TailOptions, standalone: impl FnOnce(NewSubscriber) -> F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let request = args.request.clone();
    let mut in_process = None;
    let mut standalone = Some(standalone);
    let lines = match UnixStream::connect(&args.socket).await {
        Ok(mut stream) => {
            let mut line = serde_json::to_vec(&request).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = stream.write_all(&line).await {
                eprintln!(
                    "tcpmon tail: error: sending the request to {}: {e}",
                    args.socket.display()
                );
                return ExitCode::FAILURE;
            }
            Lines::Daemon(BufReader::with_capacity(64 * 1024, stream))
        }
        Err(e)
            if request.view == View::CloseWait
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
        {
            // Only the daemon has watched connections enter CLOSE_WAIT.
            eprintln!(
                "tcpmon tail: error: --close-wait lists what the daemon tracks, and no daemon \
                 answers at {} ({e})",
                args.socket.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            eprintln!(
                "tcpmon tail: no daemon at {}; running stand-alone (loading the eBPF program)",
                args.socket.display()
            );
            let (client, queue) = super::hub::queue(request.clone());
            if let Some(standalone) = standalone.take() {
                in_process = Some(tokio::spawn(standalone(client)));
            }
            Lines::InProcess { queue, rest: Bytes::new() }
        }
        Err(e) => {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (the tail socket is owner-only: run as the daemon's user)"
            } else {
                ""
            };
            eprintln!("tcpmon tail: error: cannot connect to {}: {e}{hint}", args.socket.display());
            return ExitCode::FAILURE;
        }
    };

    let end = tokio::select! {
        end = print(lines, &args, &request) => end,
        _ = tokio::signal::ctrl_c() => End::Done,
    };
    match end {
        End::Done => ExitCode::SUCCESS,
        End::Failed(message) => {
            // A stand-alone pipeline that failed (e.g. not root) explains itself best.
            if let Some(handle) = in_process {
                if let Ok(Err(e)) = handle.await {
                    eprintln!("tcpmon tail: error: {e:#}");
                    return ExitCode::from(crate::exit::code(&e));
                }
            }
            eprintln!("tcpmon tail: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Whether a line is a connection or transition record (not hello, error or missed).
fn is_record(line: &[u8]) -> bool {
    line.starts_with(br#"{"type":"connection","#) || line.starts_with(br#"{"type":"transition","#)
}

async fn print(mut lines: Lines, args: &TailOptions, request: &Subscribe) -> End {
    let stdout = std::io::stdout();
    let color = !args.json && !args.no_color && stdout.is_terminal();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut printed = 0u64;
    let mut line = Vec::new();
    loop {
        // Flushed whenever no further line is at hand: at once when idle, once per many
        // lines under load. A closed stdout (`| head`) is a normal end, not an error.
        if !lines.has_more() && out.flush().is_err() {
            return End::Done;
        }
        match lines.next(&mut line).await {
            Ok(true) => {}
            // A listing ends when it is complete.
            Ok(false) if request.view == View::CloseWait => {
                let _ = out.flush();
                return End::Done;
            }
            Ok(false) => {
                return End::Failed("the record stream ended (did the daemon stop?)".into())
            }
            Err(e) => return End::Failed(format!("reading records: {e}")),
        }
        // --json passes records through untouched: serde writes the "type" tag first, so a
        // prefix says what a line is without parsing it (only control lines get parsed).
        let (text, counts) = if args.json && is_record(&line) {
            (std::borrow::Cow::Borrowed(line.as_slice()), true)
        } else {
            let record: TailRecord = match serde_json::from_slice(&line) {
                Ok(record) => record,
                Err(e) => return End::Failed(format!("unreadable record from the daemon: {e}")),
            };
            let counts = matches!(record, TailRecord::Connection(_) | TailRecord::Transition(_));
            let text = match &record {
                TailRecord::Error { message } => {
                    return End::Failed(format!("the daemon refused: {message}"))
                }
                TailRecord::Hello { mode, .. } => {
                    // On stderr, so stdout stays records only; scripts can wait for this line.
                    match mode.as_str() {
                        "standalone" => {
                            eprintln!("tcpmon tail: stand-alone: attached to the kernel")
                        }
                        _ if request.view == View::CloseWait => eprintln!(
                            "tcpmon tail: connections in CLOSE_WAIT now, oldest first, from the \
                             daemon at {}",
                            args.socket.display()
                        ),
                        _ => eprintln!(
                            "tcpmon tail: following the daemon at {}",
                            args.socket.display()
                        ),
                    }
                    // The header only once records can follow (not before a refusal).
                    if !args.json {
                        let header = format!("{}\n", format::header(request.view));
                        if out.write_all(header.as_bytes()).is_err() {
                            return End::Done;
                        }
                    }
                    continue;
                }
                _ if args.json => std::borrow::Cow::Borrowed(line.as_slice()),
                record => match format::human(record, color) {
                    Some(text) => std::borrow::Cow::Owned(format!("{text}\n").into_bytes()),
                    None => continue,
                },
            };
            (text, counts)
        };
        if out.write_all(&text).is_err() {
            return End::Done;
        }
        if counts {
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                let _ = out.flush();
                return End::Done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::record::{Identity, TailRecord, TransitionLine};

    #[test]
    fn records_are_recognised_by_their_serialized_prefix() {
        let transition = TailRecord::Transition(Box::new(TransitionLine {
            time: "t".into(),
            who: Identity {
                side: None,
                pid: None,
                comm: None,
                netns: None,
                cgroup_id: None,
                workload: "unknown".into(),
                family: "ipv4".into(),
                local_addr: "127.0.0.1".into(),
                local_port: 1,
                remote_addr: "127.0.0.1".into(),
                remote_port: 2,
            },
            old_state: "CLOSE".into(),
            new_state: "SYN_SENT".into(),
            in_old_state_us: None,
        }));
        assert!(is_record(&transition.to_line()));
        assert!(!is_record(&TailRecord::Missed { records: 1 }.to_line()));
        assert!(!is_record(&TailRecord::Hello { version: 1, mode: "daemon".into() }.to_line()));
        assert!(!is_record(b"{\"type\":\"error\",\"message\":\"x\"}\n"));
    }
}
