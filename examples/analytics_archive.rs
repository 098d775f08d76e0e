//! Archival of old analytics months to Parquet: `archive`, `verify`,
//! `restore` and `status` over the manifest (`analytics.archives`).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/analytics \
//!   cargo run --release --example analytics_archive -- --dir ./analytics-archive archive
//! cargo run --release --example analytics_archive -- verify --month 2024-01
//! cargo run --release --example analytics_archive -- restore --month 2024-01
//! cargo run --release --example analytics_archive -- status
//! ```
//!
//! `archive` without `--month` finishes any archival a crash interrupted,
//! then archives every month older than `--min-age-months` (24); with
//! `--month` it archives (or resumes) that one. The store is a local
//! directory (`--dir`, or `--store file:///abs/dir`); `--store
//! s3://bucket/prefix` needs the `s3` feature (`--features
//! pg_analytics/s3`) and reads its credentials and endpoint from the
//! `AWS_*` environment variables. Each result is one line on stdout;
//! errors go to stderr with a non-zero exit. See
//! `docs/pg-analytics/archival.md`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use pg_analytics::Analytics;
use pg_analytics::archive::{
    ArchiveConfig, ArchiveReport, Archiver, RestoreReport, VerifyReport, store_from_url,
};

#[derive(Debug, Parser)]
#[command(name = "analytics_archive", version)]
struct Args {
    /// The archive store: `file:///abs/dir` or `s3://bucket/prefix`.
    #[arg(long, env = "ARCHIVE_STORE", conflicts_with = "dir")]
    store: Option<String>,
    /// A local directory as the archive store (the default: ./analytics-archive).
    #[arg(long, env = "ARCHIVE_DIR")]
    dir: Option<String>,
    /// Months older than this many months are due.
    #[arg(long, default_value_t = 24)]
    min_age_months: u32,
    /// Where scratch files go (the system's temporary directory by default).
    #[arg(long)]
    scratch_dir: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Archive the due months, or one month.
    Archive {
        /// The month, `YYYY-MM`.
        #[arg(long, value_parser = parse_month)]
        month: Option<NaiveDate>,
    },
    /// Re-read a month's object from the store and check it against the
    /// manifest (and the partition and the rollup, where they apply).
    Verify {
        /// The month, `YYYY-MM`.
        #[arg(long, value_parser = parse_month)]
        month: NaiveDate,
    },
    /// Load an archived month back into its partition.
    Restore {
        /// The month, `YYYY-MM`.
        #[arg(long, value_parser = parse_month)]
        month: NaiveDate,
    },
    /// List the manifest and the archived horizon.
    Status,
}

fn parse_month(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is not a month (YYYY-MM)"))
}

fn print_archived(r: &ArchiveReport) {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    println!(
        "archived {}: {} rows in {:.2} s ({:.0} rows/s), parquet {} B, heap {} B (parquet/heap {:.3}), sha256 {}{}",
        r.month.format("%Y-%m"),
        r.rows,
        secs,
        r.rows as f64 / secs,
        r.parquet_bytes,
        r.heap_bytes,
        r.parquet_bytes as f64 / r.heap_bytes.max(1) as f64,
        r.sha256,
        r.resumed_from
            .map(|s| format!(" (resumed from {s})"))
            .unwrap_or_default(),
    );
}

fn print_verified(r: &VerifyReport) {
    println!(
        "verified {} ({}): {} rows, {} B, sha256 {} matches the manifest{}{}",
        r.month.format("%Y-%m"),
        r.state,
        r.rows,
        r.parquet_bytes,
        r.sha256,
        if r.against_partition {
            ", rows equal the partition's"
        } else {
            ""
        },
        if r.against_rollup {
            ", totals equal the rollup"
        } else {
            ""
        },
    );
}

fn print_restored(r: &RestoreReport) {
    println!(
        "restored {} into analytics.{}: {} rows in {:.2} s; horizon now {}",
        r.month.format("%Y-%m"),
        r.partition,
        r.rows,
        r.elapsed.as_secs_f64(),
        r.horizon
            .map(|h| h.to_rfc3339())
            .unwrap_or_else(|| "none".into()),
    );
}

async fn run(args: Args, url: String) -> Result<(), Box<dyn std::error::Error>> {
    let location = match (&args.store, &args.dir) {
        (Some(store), _) => store.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => "./analytics-archive".to_owned(),
    };
    let mut config = ArchiveConfig::default().with_min_age_months(args.min_age_months);
    if let Some(dir) = &args.scratch_dir {
        config = config.with_scratch_dir(dir);
    }
    eprintln!(
        "analytics_archive: store {location}, min age {} months, scratch {}",
        config.min_age_months,
        config.scratch_dir.display()
    );
    let objects = store_from_url(&location)?;
    let pool = pg_kit::pool(&url, &pg_kit::PoolConfig::default())?;
    let store = Analytics::new(pool, time_kit::system());
    store.migrate().await?;
    let archiver = Archiver::new(store, objects, config);
    match args.command {
        Command::Archive { month: Some(month) } => print_archived(&archiver.archive(month).await?),
        Command::Archive { month: None } => {
            let report = archiver.archive_due_report().await?;
            if report.archived.is_empty() && report.failed.is_empty() {
                println!(
                    "nothing is due (cutoff {})",
                    archiver.cutoff().format("%Y-%m")
                );
            }
            report.archived.iter().for_each(print_archived);
            for month in &report.not_attempted {
                println!("{} not attempted", month.format("%Y-%m"));
            }
            // Every month that failed is listed; the run fails with the
            // first one.
            for failure in &report.failed {
                eprintln!(
                    "{} failed: {}",
                    failure.month.format("%Y-%m"),
                    failure.error
                );
            }
            if let Some(first) = report.failed.into_iter().next() {
                return Err(first.error.into());
            }
        }
        Command::Verify { month } => print_verified(&archiver.verify(month).await?),
        Command::Restore { month } => print_restored(&archiver.restore(month).await?),
        Command::Status => {
            for r in archiver.manifest().await? {
                println!(
                    "{} {:<9} rows {:>12} parquet {:>12} B heap {:>12} B {}{}",
                    r.month.format("%Y-%m"),
                    r.state.as_str(),
                    r.rows.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                    r.parquet_bytes
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    r.heap_bytes
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    r.object_path,
                    r.last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default(),
                );
            }
            let horizon = archiver.horizon().await?;
            println!(
                "horizon: {}",
                horizon
                    .map(|h| h.to_rfc3339())
                    .unwrap_or_else(|| "none".into())
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("analytics_archive: set DATABASE_URL (the analytics database)");
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args, url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                line.push_str(": ");
                line.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("analytics_archive: {line}");
            ExitCode::FAILURE
        }
    }
}
