//! What a person sees running the README's main command: under a real
//! pseudo-terminal, a live progress display as the last thing on the
//! screen and no worker step lines, then a summary; without a terminal,
//! plain lines; and every rank's full log on disk either way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gancluster_tests::pty::Terminal;
use gancluster_tests::{run, tiny_coordinator, wait_for_steps};

const LIMIT: Duration = Duration::from_secs(240);

fn main_command(steps: u64, out: &Path) -> Command {
    let mut cmd = tiny_coordinator(4, steps, out);
    cmd.arg("--store")
        .arg(format!("file://{}", out.join("store").display()))
        .env("GANCLUSTER__TRAIN__LOG_EVERY", "10");
    cmd
}

#[test]
fn on_a_terminal_the_progress_display_is_last_and_worker_step_lines_stay_in_files() {
    let out = tempfile::tempdir().unwrap();
    let terminal = Terminal::spawn(&mut main_command(400, out.path()), 40, 160);
    wait_for_steps(out.path(), 60);
    let screen = terminal.screen();
    let shown: Vec<&String> = screen.iter().filter(|row| !row.is_empty()).collect();
    let text = screen.join("\n");
    let last = shown.last().expect("something on the screen");
    for part in [
        "/400 ep ",
        " img/s | D ",
        " D(x) ",
        "D(G(z))",
        "allreduce",
        "4/4 workers",
        "ckpt",
    ] {
        assert!(
            last.contains(part),
            "the last line is not the progress display ({part}):\n{text}"
        );
    }
    assert!(
        !screen
            .iter()
            .any(|row| row.contains("[rank") && row.contains(" step ")),
        "a worker step line is on the screen:\n{text}"
    );
    assert!(
        screen
            .iter()
            .take(3)
            .any(|row| row.contains("logs/coordinator.log")),
        "the first lines do not say where the logs are:\n{text}"
    );
    let (status, screen) = terminal.wait(LIMIT);
    let text = screen.join("\n");
    assert!(status.success(), "{text}");
    for part in [
        "training finished: 400 steps in",
        "losses",
        "samples",
        "checkpoint",
        "logs",
    ] {
        assert!(text.contains(part), "the summary lacks {part}:\n{text}");
    }
    let rank0 = std::fs::read_to_string(out.path().join("logs/rank-0.log")).unwrap();
    assert!(
        rank0.contains(" step step=400"),
        "rank 0's full log:\n{rank0}"
    );
    for rank in 1..4 {
        assert!(out.path().join(format!("logs/rank-{rank}.log")).is_file());
    }
    assert!(out.path().join("logs/coordinator.log").is_file());
}

/// Without a terminal: the coordinator's own plain step lines, numbers
/// rounded for people, worker lines forwarded as torchrun does.
#[test]
fn without_a_terminal_the_coordinator_prints_plain_rounded_step_lines() {
    let out = tempfile::tempdir().unwrap();
    let done = run(&mut main_command(30, out.path()), LIMIT).assert_success();
    let lines: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.contains("coordinator::ui::progress") && l.contains(" step "))
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "one coordinator line per 10 steps:\n{}",
        done.stderr
    );
    for line in &lines {
        let d_loss = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("d_loss="))
            .unwrap_or_else(|| panic!("no d_loss in {line}"));
        let digits = d_loss.trim_start_matches(['-', '0', '.']).replace('.', "");
        assert!(
            digits.len() <= 4,
            "{d_loss} is not rounded to 4 significant digits: {line}"
        );
    }
    done.assert_says(&["[rank 0]", "training finished: 30 steps in"]);
}
