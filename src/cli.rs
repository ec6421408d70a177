//! Command-line interface: parsing, and one function per command.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use warmstart_launcher::warmpoint::ExitStatus;
use warmstart_snapshots::model::{FileDesc, Manifest, RunContent, VmaKind};
use warmstart_snapshots::store::{Snapshot, SnapshotId, Store};

use crate::dump::{self, DumpOptions, StdioPolicy};
use crate::run::Mode;
use crate::stats::human;

#[derive(Parser, Debug)]
#[command(
    name = "warmstart",
    version,
    about = "Checkpoint an app at its warm point; restore instances in milliseconds"
)]
pub struct Cli {
    /// Snapshot store directory [default: $XDG_DATA_HOME/warmstart or ~/.local/share/warmstart]
    #[arg(long, global = true, env = "WARMSTART_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// More logging (-v info, -vv debug, -vvv trace; CRIU's -v4 style works too)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Work directory: relative paths (e.g. of -D) are taken from here (as CRIU's -W)
    #[arg(short = 'W', long = "work-dir", global = true, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report whether this kernel has every feature warmstart needs; with --snapshot,
    /// whether this host can run that snapshot (its kernel's vdso, CPU features and
    /// xsave state, the files it uses)
    Check {
        #[arg(long)]
        json: bool,
        /// A snapshot (name, id, or registry reference REGISTRY/REPO:TAG) to check
        /// this host against
        #[arg(long, value_name = "SNAP|REF")]
        snapshot: Option<String>,
        #[command(flatten)]
        registry: crate::registry::RegistryOpts,
    },
    /// List snapshots
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot: process tree, memory, sizes
    Inspect {
        /// The snapshot: a name, an id, or a unique prefix of one (see `ls`)
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (its pages go at the next `gc`)
    Rm {
        /// The snapshot: a name, an id, or a unique prefix of one (see `ls`); its names
        /// go with it
        snapshot: String,
    },
    /// Delete store data no snapshot references
    Gc,
    /// Re-hash every page of every snapshot (or of one)
    Verify {
        /// The snapshot to check: a name, an id, or a unique prefix of one [default: every
        /// snapshot of the store]
        snapshot: Option<String>,
    },
    /// Checkpoint a running process (CRIU style)
    Dump(Deferred<DumpArgs>),
    /// Copy a running process's memory and track its writes for the next dump (CRIU's
    /// pre-dump; the same as `dump --pre-dump`)
    PreDump(Deferred<DumpArgs>),
    /// Holds the write tracking of a pre-dumped tree until the next dump (internal)
    #[command(name = "__track-holder", hide = true)]
    TrackHolder { path: PathBuf },
    /// Restore a snapshot (CRIU style)
    Restore(Deferred<RestoreArgs>),
    /// Run an app to its warm point and snapshot it
    #[command(override_usage = "warmstart record [OPTIONS] -- CMD [ARGS]...")]
    Record(Deferred<RecordArgs>),
    /// Start a new instance of a snapshot with this terminal's stdio
    Run(Deferred<RunArgs>),
    /// Measure what warmstart saves for an app: cold start vs restored instance
    /// (time to first answer, snapshot sizes, memory)
    #[command(override_usage = "warmstart bench [OPTIONS] -- CMD [ARGS]...")]
    Bench(Deferred<crate::bench::BenchArgs>),
    /// List running instances and the snapshot each came from
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Serve the store's snapshots (or an image directory, -D) over TCP or TLS (for `run
    /// --page-server`, `dump --page-server`)
    PageServer(Deferred<PageServerArgs>),
    /// Upload a snapshot to an OCI registry (REGISTRY/REPO:TAG)
    Push(Deferred<crate::registry::PushArgs>),
    /// Fetch a snapshot from an OCI registry into the store
    Pull(Deferred<crate::registry::PullArgs>),
    /// Keep credentials for a registry (in ~/.docker/config.json, as docker does)
    Login(Deferred<crate::registry::LoginArgs>),
    /// Restore instances on request for `warmstart run`, from pools of parked instances
    Serve(Deferred<ServeArgs>),
    /// Write an executable DIR/NAME that runs tool snapshot SNAPSHOT with its arguments
    /// (or the tool cold when warmstart, its store or the snapshot cannot be used): put
    /// DIR first in PATH
    Shim {
        /// The tool snapshot (`record --tool`)
        snapshot: String,
        /// Directory to write the shim in
        #[arg(long)]
        dir: PathBuf,
        /// The shim's file name [default: the snapshot's name]
        #[arg(long)]
        name: Option<String>,
    },
}

/// A subcommand's options, built only when that subcommand is the one given (clap's
/// `Command::defer`): every command line would otherwise build every command's options
/// first, about half a millisecond of each `warmstart run`.
#[derive(Debug, Clone, Default)]
pub struct Deferred<T>(pub T);

impl<T> std::ops::Deref for Deferred<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Deferred<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: clap::FromArgMatches> clap::FromArgMatches for Deferred<T> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(m).map(Self)
    }
    fn from_arg_matches_mut(m: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(m).map(Self)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
    fn update_from_arg_matches_mut(&mut self, m: &mut clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(m)
    }
}

impl<T: Args> Args for Deferred<T> {
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.defer(|c| keeping_about(c, T::augment_args))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        cmd.defer(|c| keeping_about(c, T::augment_args_for_update))
    }
}

/// Built late, a subcommand's options would replace its description with that of a
/// struct they flatten (`TlsArgs`): the subcommand's own stays.
fn keeping_about(cmd: clap::Command, augment: fn(clap::Command) -> clap::Command) -> clap::Command {
    let about = cmd.get_about().cloned();
    let long_about = cmd.get_long_about().cloned();
    let keep = |s: Option<clap::builder::StyledStr>| {
        s.map_or(
            clap::builder::Resettable::Reset,
            clap::builder::Resettable::Value,
        )
    };
    augment(cmd).about(keep(about)).long_about(keep(long_about))
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Unix socket to listen on [default: serve.sock in the store, where `run` looks]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Instances kept parked per snapshot (restored up to their last step); 0: none
    #[arg(long, default_value_t = 1)]
    pub pool: usize,
    /// The most instances parked per snapshot when requests come faster than the pool
    /// refills (it grows by one per request that finds none ready, and shrinks back when
    /// they go unused) [default: 4 × --pool]
    #[arg(long, value_name = "N")]
    pub pool_max: Option<usize>,
    /// Park instances of this snapshot at once (else at its first request); repeatable. A
    /// registry reference (REGISTRY/REPO:TAG) is pulled into the store first unless the
    /// store has it; `run REF` is then served from it
    #[arg(long, value_name = "SNAPSHOT|REF")]
    pub warm: Vec<String>,
    #[command(flatten)]
    pub registry: crate::registry::RegistryOpts,
    /// Drop a snapshot's template (the restored memory its instances share) after it has
    /// parked no instance for this long
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub idle: u64,
    /// Restore every instance on its own, without templates (each holds its own copy of
    /// the snapshot's memory)
    #[arg(long)]
    pub no_templates: bool,
}

#[derive(Args, Debug)]
pub struct PageServerArgs {
    /// TCP port (0: any free port; the bound address is printed on stdout)
    #[arg(long)]
    pub port: u16,
    /// Address to listen on. Loopback by default: without TLS and client certificates
    /// (--tls-cert, --tls-key, --tls-cacert) anyone who can reach another address can read
    /// every snapshot
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Serve (and receive) the image directory DIR (`dump -D DIR`, `restore -D DIR`)
    /// instead of the store; it receives one dump, into an empty DIR
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// With -D, one step of a live migration per directory, as CRIU's: the image
    /// directory of the previous step (relative to DIR when relative), whose pre-dump the
    /// dumps sent here may take pages from (`--prev ID`); its packs are linked into DIR
    /// (copied across filesystems), so DIR is restorable alone
    #[arg(long, value_name = "PREV", requires = "dir")]
    pub prev_images_dir: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS for the page-server protocol (CRIU's options).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Page server over TLS: this side's certificate (PEM). A page server presents it;
    /// a client presents it to a server that requires client certificates
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Page server over TLS: the private key of --tls-cert (PEM, unencrypted)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Page server over TLS: the CA certificate (PEM). A client verifies the page server
    /// against it; a page server given it requires every client to present a certificate
    /// signed by it
    #[arg(long, value_name = "FILE")]
    pub tls_cacert: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> warmstart_snapshots::remote::tls::TlsFiles {
        warmstart_snapshots::remote::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            cacert: self.tls_cacert.clone(),
        }
    }

    /// The client side's TLS (`None`: plain TCP).
    pub fn client(&self) -> Result<Option<warmstart_snapshots::remote::tls::ClientTls>> {
        Ok(self.files().client()?)
    }

    /// TLS options only make sense with `--page-server`.
    fn only_with(&self, page_server: &Option<String>) -> Result<()> {
        if page_server.is_none() && !self.files().is_empty() {
            bail!(
                "--tls-cert, --tls-key and --tls-cacert are for talking to a page server: \
                 add --page-server HOST:PORT or drop them"
            );
        }
        Ok(())
    }

    /// The page server's TLS (`None`: plain TCP).
    pub fn server(&self) -> Result<Option<warmstart_snapshots::remote::tls::ServerTls>> {
        Ok(self.files().server()?)
    }
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Pid of the process to dump
    #[arg(short = 't', long = "tree")]
    pub pid: i32,
    /// Name the snapshot
    #[arg(long)]
    pub name: Option<String>,
    /// Write a self-contained image directory instead of the store
    #[arg(short = 'D', long = "images-dir")]
    pub dir: Option<PathBuf>,
    /// Leave the process running after the dump (default: kill it)
    #[arg(short = 'R', long)]
    pub leave_running: bool,
    /// Leave the process stopped (SIGSTOP) after the dump
    #[arg(short = 's', long, conflicts_with = "leave_running")]
    pub leave_stopped: bool,
    /// The process is a job of an interactive shell: its terminal fds are not dumped
    /// but replaced by the restorer's terminal (without it, a terminal fd is refused).
    /// Pipe and socket stdio is always the caller's.
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Dump established TCP connections; they are restored as reset by their peer
    #[arg(long)]
    pub tcp_close: bool,
    /// Checkpoint established TCP connections, half-closed ones included, with TCP_REPAIR
    /// (sequence numbers, queues, window, options, state); their packets are held by a
    /// network lock meanwhile, and `restore --tcp-established` brings them back without
    /// the peer noticing
    #[arg(long, conflicts_with = "tcp_close")]
    pub tcp_established: bool,
    /// Print phase timings and sizes
    #[arg(long)]
    pub display_stats: bool,
    /// Send the snapshot to the page server at HOST:PORT instead of the local store
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "dir")]
    pub page_server: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Record each process's cgroups and the settings of the cgroups the tree owns
    /// (below warmstart's own cgroup, holding only the tree's processes)
    #[arg(long)]
    pub manage_cgroups: bool,
    /// Copy the tree's private memory while it runs (frozen only briefly) into a
    /// snapshot that is not restorable, and track the pages written from now on, for
    /// the next `--pre-dump` or the final dump with `--prev` (repeatable)
    #[arg(long, conflicts_with_all = ["leave_stopped", "tcp_established", "tcp_close", "manage_cgroups"])]
    pub pre_dump: bool,
    /// The last pre-dump of this tree (its id or name, in the store or page server this
    /// dump writes to): the pages not written since are taken from it instead of read
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "dir")]
    pub prev: Option<String>,
    /// With -D: the image directory of this tree's last pre-dump (CRIU's form; a relative
    /// PATH is taken from the -D directory). Its pages not written since are taken from
    /// it; its packs are linked into the -D directory, which stays restorable alone
    #[arg(long, value_name = "PATH", requires = "dir")]
    pub prev_images_dir: Option<PathBuf>,
    /// Accepted for CRIU's command lines: memory is always tracked after a pre-dump
    #[arg(long, hide = true)]
    pub track_mem: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Recreate the snapshot's cgroups (`dump --manage-cgroups`) and put each process
    /// back in its cgroup before it runs
    #[arg(long)]
    pub manage_cgroups: bool,
    /// With --manage-cgroups: recreate the tree's own cgroups under DIR instead of where
    /// they were (absolute in each hierarchy, or relative to warmstart's own cgroup)
    #[arg(long, value_name = "DIR", requires = "manage_cgroups")]
    pub cgroup_root: Option<String>,
    /// Snapshot id (or unique prefix) or name
    #[arg(required_unless_present = "dir")]
    pub snapshot: Option<String>,
    /// Restore from an image directory written by `dump -D`
    #[arg(short = 'D', long = "images-dir", conflicts_with = "snapshot")]
    pub dir: Option<PathBuf>,
    /// Return once the process runs, printing its pid
    #[arg(short = 'd', long = "restore-detached")]
    pub detach: bool,
    /// Serve memory on demand with userfaultfd (CRIU's --lazy-pages) instead of copying
    /// it all first
    #[arg(long, alias = "lazy-pages")]
    pub lazy: bool,
    /// Print phase timings
    #[arg(long)]
    pub display_stats: bool,
    /// Fetch the snapshot and its pages from the page server at HOST:PORT
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "dir")]
    pub page_server: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With --page-server: take the page server for dead (and kill the instance, naming
    /// it) when a connect or an answer takes longer than this
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub page_server_timeout: u64,
    /// Restore a job dumped with --shell-job: it gets this terminal (the restorer's
    /// stdin, stdout and stderr) in place of its old one; the restored job always does
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Restore the established TCP connections of a snapshot dumped with
    /// --tcp-established (refused without it)
    #[arg(long)]
    pub tcp_established: bool,
    /// The snapshot's veth interface NAME gets its new peer named HOSTNAME in
    /// warmstart's network namespace, made a port of bridge BRIDGE when given (CRIU's
    /// `--external veth[NAME]:HOSTNAME@BRIDGE`). Default: the peer's name at the dump.
    /// Repeatable
    #[arg(long, value_name = "NAME=HOSTNAME[@BRIDGE]", value_parser = crate::restore::namespaces::VethMap::parse)]
    pub veth: Vec<crate::restore::namespaces::VethMap>,
}

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Name the snapshot
    #[arg(long)]
    pub name: Option<String>,
    /// When to take the snapshot: `stdin` (first read of fd 0), `listen` (first wait
    /// for a connection), `notify` (the app writes READY=1 to $WARMSTART_NOTIFY_FD, or
    /// to $NOTIFY_SOCKET sd_notify style), `after=DURATION` (e.g. after=2s), `signal`
    /// (the app stops itself with SIGSTOP)
    #[arg(long, default_value = "stdin")]
    pub ready: String,
    /// Give up if the app has not reached its warm point after this many seconds
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Dump established TCP connections; they are restored as reset by their peer
    #[arg(long)]
    pub tcp_close: bool,
    /// Checkpoint established TCP connections, half-closed ones included, with TCP_REPAIR
    /// (sequence numbers, queues, window, options, state); their packets are held by a
    /// network lock meanwhile, and `restore --tcp-established` brings them back without
    /// the peer noticing
    #[arg(long, conflicts_with = "tcp_close")]
    pub tcp_established: bool,
    /// After the snapshot, let the app go on with this terminal's stdio until it exits
    /// (a `notify` app reads `RESTORED=0`); exit with its status
    #[arg(short = 'R', long)]
    pub leave_running: bool,
    /// Let the app use the host's /tmp. By default it gets a private /tmp (a fresh
    /// tmpfs, as in a container): what it leaves there at the warm point goes into the
    /// snapshot, and every restored instance gets its own copy
    #[arg(long)]
    pub share_tmp: bool,
    /// Record with address-space layout randomization off for the app (personality
    /// `ADDR_NO_RANDOMIZE`, as `setarch -R`), so that recording an unchanged app again
    /// gives the same layout and mostly the same pages: the store keeps, and a re-push
    /// uploads, only what changed. Its instances share the snapshot's one layout anyway.
    /// (A Python app also needs `PYTHONHASHSEED` fixed, to a value of your own.)
    #[arg(long)]
    pub reproducible: bool,
    /// Show the app (and every process of its tree, across fork and exec) only the CPU
    /// features of this x86-64 psABI level through CPUID, from its start: x86-64-v2,
    /// x86-64-v3 or x86-64-v4. The snapshot then needs only that level (plus the system
    /// bits the README lists) and runs on any CPU that has it; once restored the app
    /// sees the real CPU. Needs CPUID faulting (cpuid_fault in /proc/cpuinfo)
    #[arg(long, value_name = "LEVEL", value_parser = |s: &str| crate::sys::cpuid::Baseline::parse(s))]
    pub cpu_baseline: Option<crate::sys::cpuid::Baseline>,
    /// Run the app in a uts namespace of its own (its host name starts as the host's;
    /// what it sets stays its own): every restored instance gets its own, with the host
    /// name and domain name the app had at the warm point
    #[arg(long)]
    pub uts: bool,
    /// Run the app in an ipc namespace of its own: its System V shared memory,
    /// semaphores and message queues go into the snapshot and every restored instance
    /// gets its own copy of them, at the same ids
    #[arg(long)]
    pub ipc: bool,
    /// `private`: run the app in a network namespace of its own with only a loopback
    /// interface (up, 127.0.0.1 and ::1); every restored instance gets its own, with the
    /// addresses and routes the app's loopback had. `host` (default): the host's network
    #[arg(long, value_name = "private|host", default_value = "host")]
    pub net: String,
    /// Warm the app up before the snapshot. `--ready stdin`: this line is written to the
    /// app's stdin at its first read, and the snapshot is taken at the first read after
    /// the app has consumed all of it (its answers go to our stderr). `--ready listen`:
    /// this is the path of an HTTP GET sent to the port the app listens on at its first
    /// wait for a connection; the snapshot is taken once it is answered and closed.
    /// Caches filled and code compiled by it are in the snapshot — and so is any state it
    /// changed (e.g. a request counter). Repeatable: one line / request each.
    #[arg(long, value_name = "LINE|PATH")]
    pub prime: Vec<String>,
    /// Print phase timings and sizes
    #[arg(long)]
    pub display_stats: bool,
    /// Record a command-line tool at its entry point (`python3 -m MOD`, `python3 SCRIPT`,
    /// a Python console script): each `run SNAP -- ARGS` then runs it with its own
    /// arguments, working directory, environment and stdio
    #[arg(long)]
    pub tool: bool,
    /// With --tool: run the tool once with these arguments before the snapshot (output to
    /// stderr, exit intercepted), so its lazy imports are in the snapshot. Repeatable
    #[arg(long, value_name = "ARGS", requires = "tool")]
    pub prime_args: Vec<String>,
    /// The command to run and its arguments (after `--`)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Snapshot id (or unique prefix) or name, or a registry reference
    /// (REGISTRY/REPO:TAG, run lazily from the registry)
    pub snapshot: String,
    #[command(flatten)]
    pub registry: crate::registry::RegistryOpts,
    /// From a registry: fetch only the pages the instance touches (do not fetch the rest
    /// in the background and keep it in the store)
    #[arg(long)]
    pub no_stream: bool,
    /// Run the instance in a cgroup of its own with this memory limit (bytes, or with K,
    /// M, G, T); restored here, not by a serve daemon
    #[arg(long, value_name = "SIZE", value_parser = crate::cgroup::parse_size)]
    pub memory: Option<u64>,
    /// Run the instance in a cgroup of its own limited to N CPUs (2, 0.5)
    #[arg(long, value_name = "N", value_parser = crate::cgroup::parse_cpus)]
    pub cpus: Option<f64>,
    /// Run the instance in a cgroup of its own limited to N processes and threads
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pids: Option<u64>,
    /// Copy all memory before the app resumes instead of serving it on demand
    #[arg(long)]
    pub eager: bool,
    /// Do not prefetch (or learn) the snapshot's working set
    #[arg(long)]
    pub no_prefetch: bool,
    /// Print phase timings
    #[arg(long)]
    pub display_stats: bool,
    /// Fetch the snapshot and its pages on demand from the page server at HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    pub page_server: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With --page-server: take the page server for dead (and kill the instance, naming
    /// it) when a connect or an answer takes longer than this
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub page_server_timeout: u64,
    /// Restore here even when a `warmstart serve` daemon listens on the store's socket
    #[arg(long)]
    pub no_serve: bool,
    /// Give the instance a new listening socket bound to ADDR (IP:PORT, or a PORT on the
    /// recorded IP; same options and backlog) in place of the one it recorded; with
    /// several listeners, PORT=ADDR names the recorded port. Repeatable. Systemd-style
    /// LISTEN_FDS/LISTEN_PID sockets are handed to the app the same way, in order.
    #[arg(long, value_name = "[PORT=]ADDR")]
    pub listen: Vec<String>,
    /// A tool snapshot (`record --tool`): set K=V in the environment the tool gets (the
    /// caller's, else). Repeatable
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// A tool snapshot: start the tool's environment empty (then --env)
    #[arg(long)]
    pub clear_env: bool,
    /// A tool snapshot whose files changed since the record: `cold` runs the tool cold
    /// this time (and records it again in the background), `fail` refuses
    #[arg(long, value_name = "cold|fail", default_value = "cold")]
    pub stale: String,
    /// A tool snapshot: the tool's arguments (after `--`)
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
    /// (For shims.) When the snapshot cannot be run warm (missing, refused by this host,
    /// its files changed), run this command cold with the arguments instead; repeatable,
    /// one word each
    #[arg(long, value_name = "WORD", hide = true, allow_hyphen_values = true)]
    pub or_cold: Vec<String>,
}

fn default_store() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("warmstart"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_DATA_HOME nor HOME is set: pass --store DIR")?;
    Ok(PathBuf::from(home).join(".local/share/warmstart"))
}

fn store_dir(cli: &Cli) -> Result<PathBuf> {
    match &cli.store {
        Some(d) => Ok(d.clone()),
        None => default_store(),
    }
}

/// The store `cli` names (for other modules' commands).
pub fn open_store_for(cli: &Cli) -> Result<Store> {
    open_store(cli)
}

fn open_store(cli: &Cli) -> Result<Store> {
    Ok(Store::open(&store_dir(cli)?)?)
}

/// The store `cli` names, for a command that only reads it (or removes from it):
/// nothing is created, and a store that does not exist says so.
fn open_store_ro(cli: &Cli) -> Result<Store> {
    let dir = store_dir(cli)?;
    match Store::open_existing(&dir) {
        Err(warmstart_snapshots::store::StoreError::NoStore { .. }) if cli.store.is_some() => {
            bail!(
                "store {} does not exist (named by --store or $WARMSTART_STORE): check the \
                 path; `warmstart record` creates a store",
                dir.display()
            )
        }
        Err(warmstart_snapshots::store::StoreError::NoStore { .. }) => bail!(
            "store {} does not exist yet: nothing has been recorded (`warmstart record` \
             creates it), or pass --store DIR",
            dir.display()
        ),
        r => Ok(r?),
    }
}

/// Runs `f` with the store (or image directory) at `dir`, opened for writing; when `f`
/// fails and the directory was created for it, it is removed again, so that a failed
/// command leaves no empty store behind.
fn with_new_store<T>(dir: &std::path::Path, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
    let existed = dir.exists();
    let store = Store::open(dir)?;
    let r = f(&store);
    if r.is_err() && !existed && store.ids().is_ok_and(|ids| ids.is_empty()) {
        let _ = std::fs::remove_dir_all(dir);
    }
    r
}

/// Runs the parsed command; returns the process exit code.
/// CRIU spells verbosity `-v4`: turn `-vN` into N `v`s before clap sees it.
pub fn normalize_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str().and_then(|s| s.strip_prefix("-v")) {
        Some(n) if !n.is_empty() && n.len() <= 2 && n.bytes().all(|b| b.is_ascii_digit()) => {
            let n: usize = n.parse().unwrap_or(0);
            format!("-{}", "v".repeat(n.clamp(1, 4))).into()
        }
        _ => a,
    })
    .collect()
}

pub fn main(cli: Cli) -> Result<i32> {
    if let Some(dir) = &cli.work_dir {
        std::env::set_current_dir(dir).with_context(|| format!("-W {}", dir.display()))?;
    }
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::PageServer(_) | Command::Bench(_)
    ) {
        crate::progress::enable();
    }
    match &cli.command {
        Command::Check {
            json,
            snapshot: Some(which),
            registry,
        } => {
            let snap = if warmstart_snapshots::registry::Reference::looks_like(which) {
                let r = warmstart_snapshots::registry::Reference::parse(which)
                    .map_err(|e| anyhow::anyhow!("{which}: {e}"))?;
                Snapshot::open_registry(&r, &registry.options(), None, None)
                    .with_context(|| format!("cannot open {r}"))?
            } else {
                load(&open_store_ro(&cli)?, which)?.0
            };
            Ok(if crate::check::snapshot(&snap, *json)? {
                0
            } else {
                1
            })
        }
        Command::Check { json, .. } => Ok(if crate::check::run(*json)? { 0 } else { 1 }),
        Command::Ls { json } => {
            // The default store not there yet is an empty one.
            let dir = store_dir(&cli)?;
            if cli.store.is_none() && !dir.exists() {
                return ls(&[], *json);
            }
            ls(&open_store_ro(&cli)?.list()?, *json)
        }
        Command::Inspect { snapshot, json } => inspect(&open_store_ro(&cli)?, snapshot, *json),
        Command::Rm { snapshot } => {
            let id = open_store_ro(&cli)?.remove(snapshot)?;
            println!("removed {}", id.short());
            Ok(0)
        }
        Command::Gc => {
            let mut spinner = None;
            let r = open_store_ro(&cli)?.gc_waiting(&mut |waiting| {
                if waiting {
                    spinner = Some(crate::progress::Spinner::new(
                        "gc: waiting for the store lock (another warmstart is writing to the store)",
                    ));
                    tracing::info!("waiting for the store lock (another warmstart is writing)");
                } else {
                    spinner = None;
                }
            })?;
            println!(
                "removed {} pack(s), {} temp file(s), {} orphan table(s); freed {}; {} pack(s) live",
                r.removed_packs.len(),
                r.removed_temp_files,
                r.removed_orphan_tables,
                human(r.freed_bytes),
                r.live_packs
            );
            Ok(0)
        }
        Command::Verify { snapshot } => verify(&open_store_ro(&cli)?, snapshot.as_deref()),
        Command::Dump(a) => dump_cmd(&cli, a, a.pre_dump),
        Command::PreDump(a) => dump_cmd(&cli, a, true),
        Command::TrackHolder { path } => crate::dump::track::holder_main(path),
        Command::Restore(a) => restore_cmd(&cli, a),
        Command::Record(a) => record_cmd(&cli, a),
        Command::Ps { json } => ps(*json),
        Command::Bench(a) => crate::bench::bench_command(&open_store(&cli)?, a),
        Command::PageServer(a) => {
            let tls = a.tls.server()?;
            let bind = (a.bind, a.port).into();
            match &a.dir {
                Some(dir) => {
                    let store = Store::open_image_dir(dir)?;
                    let prev = match &a.prev_images_dir {
                        None => None,
                        Some(p) => {
                            let path = if p.is_relative() {
                                join_lexically(dir, p)
                            } else {
                                p.clone()
                            };
                            let prev = Store::open_existing(&path)
                                .with_context(|| format!("--prev-images-dir {}", p.display()))?;
                            store.adopt_packs(&prev).with_context(|| {
                                format!(
                                    "linking the pages of {} into {}",
                                    path.display(),
                                    dir.display()
                                )
                            })?;
                            Some(prev)
                        }
                    };
                    let images = crate::pageserver::ImageDir {
                        dir,
                        prev: prev.as_ref(),
                    };
                    crate::pageserver::serve(&store, bind, tls, Some(images))?
                }
                None => crate::pageserver::serve(&open_store(&cli)?, bind, tls, None)?,
            }
            Ok(0)
        }
        Command::Serve(a) => {
            let store = open_store(&cli)?;
            let socket = a
                .socket
                .clone()
                .unwrap_or_else(|| crate::serve::socket_path(store.dir()));
            let warm = (a.warm.iter())
                .map(
                    |w| match warmstart_snapshots::registry::Reference::looks_like(w) {
                        true => crate::registry::pull_for_serve(&store, w, &a.registry)
                            .with_context(|| format!("--warm {w}")),
                        false => Ok(w.clone()),
                    },
                )
                .collect::<Result<Vec<_>>>()?;
            let opts = crate::serve::ServeOptions {
                socket,
                pool: a.pool,
                pool_max: a.pool_max.unwrap_or(4 * a.pool),
                warm,
                template_idle: (!a.no_templates)
                    .then(|| std::time::Duration::from_secs(a.idle.max(1))),
            };
            crate::serve::serve(store, &opts)
        }
        Command::Shim {
            snapshot,
            dir,
            name,
        } => crate::tool::write_shim(&cli, snapshot, dir, name.as_deref()),
        Command::Push(a) => crate::registry::push(&open_store_ro(&cli)?, a),
        Command::Pull(a) => with_new_store(&store_dir(&cli)?, |s| crate::registry::pull(s, a)),
        Command::Login(a) => crate::registry::login(a),
        Command::Run(a) => {
            a.tls.only_with(&a.page_server)?;
            let from_registry = warmstart_snapshots::registry::Reference::looks_like(&a.snapshot);
            let remote = a.page_server.is_some() || from_registry;
            let mut puller = None;
            let limits = crate::cgroup::Limits {
                memory: a.memory,
                cpus: a.cpus,
                pids: a.pids,
            };
            // An instance in a cgroup of its own is restored here, never by a daemon.
            let no_serve = a.no_serve || limits.any();
            let cgroups = if limits.any() {
                crate::run::Cgroups::Limits(limits)
            } else {
                crate::run::Cgroups::Inherit
            };
            let systemd = crate::fds::inet::systemd_listeners()?;
            let given_listeners = !a.listen.is_empty() || systemd.is_some();
            // A daemon serves the plain lazy run (an instance given its listeners once
            // they are bound, below); other modes are restored here.
            if !(no_serve
                || a.eager
                || a.no_prefetch
                || a.page_server.is_some()
                || given_listeners
                || !a.args.is_empty())
            {
                let dir = store_dir(&cli)?;
                let socket = crate::serve::socket_path(&dir);
                // A registry snapshot the store has (pulled, or by `serve --warm REF`) is
                // the daemon's to serve: asked for by the id the reference names now.
                let which = match from_registry && socket.exists() {
                    true => crate::registry::stored_id(&dir, &a.snapshot, &a.registry)?,
                    false => (!from_registry).then(|| a.snapshot.clone()),
                };
                if let Some(which) = which {
                    if let Some(code) =
                        crate::serve::client::run(&socket, &which, a.display_stats, None)?
                    {
                        return Ok(code);
                    }
                }
            }
            // A tool's run goes to a daemon as it is: the daemon checks the tool's files
            // and start-up environment and leaves anything but a warm run to the checks
            // below, so nothing of the snapshot is read here.
            let may_serve = !(no_serve || a.eager || a.no_prefetch || remote);
            let tool_args = !a.args.is_empty() && matches!(a.stale.as_str(), "cold" | "fail");
            if may_serve && tool_args && !given_listeners {
                let socket = crate::serve::socket_path(&store_dir(&cli)?);
                let req = crate::tool::request(&a.args, &crate::tool::run_env(a)?)?;
                if let Some(code) =
                    crate::serve::client::run_tool(&socket, &a.snapshot, a.display_stats, req)?
                {
                    return Ok(code);
                }
            }
            // A daemon serves a `run --listen` too: it names the snapshot's listeners, so
            // nothing of the snapshot is read here before their replacements are bound.
            if given_listeners
                && a.args.is_empty()
                && a.env.is_empty()
                && !a.clear_env
                && a.or_cold.is_empty()
                && may_serve
            {
                let socket = crate::serve::socket_path(&store_dir(&cli)?);
                if let Some(session) = crate::serve::client::listeners(&socket, &a.snapshot)? {
                    let given =
                        crate::fds::inet::replacements(&session.listeners, &a.listen, systemd)?;
                    let all = crate::fds::inet::complete(&session.listeners, &given)?;
                    let fds: Vec<_> = all
                        .iter()
                        .map(|(_, fd)| std::os::fd::AsFd::as_fd(&**fd))
                        .collect();
                    return match session.run(a.display_stats, &fds)? {
                        Some(code) => Ok(code),
                        None => bail!(
                            "the serve daemon at {} named the listeners of {} but then \
                             declined to run it (removed meanwhile?): run it again",
                            socket.display(),
                            a.snapshot
                        ),
                    };
                }
            }
            let loaded = (|| -> Result<(Arc<Snapshot>, Vec<String>)> {
                // (A serve daemon restores for its users; restoring here needs these.)
                crate::check::require_privileges("run")?;
                if from_registry {
                    let store = Store::open(&store_dir(&cli)?).ok();
                    let (snap, pull) = crate::registry::open_for_run(
                        store.as_ref(),
                        &a.snapshot,
                        &a.registry,
                        !a.no_stream,
                    )?;
                    puller = pull;
                    return Ok((snap, Vec::new()));
                }
                let (snap, names) = match &a.page_server {
                    Some(addr) => (
                        Snapshot::connect_tls(
                            addr,
                            &a.snapshot,
                            Duration::from_secs(a.page_server_timeout),
                            a.tls.client()?.as_ref(),
                        )?,
                        Vec::new(),
                    ),
                    None => load(&open_store_ro(&cli)?, &a.snapshot)?,
                };
                if !a.or_cold.is_empty() {
                    // A shim: what would refuse the restore runs the tool cold instead.
                    crate::restore::checks::host(&snap.manifest.host)?;
                    crate::restore::checks::unchanged_files(&snap.manifest)?;
                }
                Ok((Arc::new(snap), names))
            })();
            let (snap, names) = match loaded {
                Ok(x) => x,
                Err(e) if !a.or_cold.is_empty() => {
                    eprintln!(
                        "warmstart: cannot run {} warm ({}): running it cold",
                        a.snapshot,
                        crate::report::error_line(&e)
                    );
                    return crate::tool::run_cold(&a.or_cold, a);
                }
                Err(e) => return Err(e),
            };
            let mode = if a.eager {
                Mode::Eager
            } else {
                Mode::Lazy {
                    prefetch: !a.no_prefetch,
                }
            };
            if let Some(code) = crate::tool::run_stale_or_check(&cli, a, &snap, &names)? {
                return Ok(code);
            }
            let tool_request = match &snap.manifest.tool {
                Some(_) => Some(crate::tool::request(&a.args, &crate::tool::run_env(a)?)?),
                None => None,
            };
            // A tool's run goes through a daemon too (once its files were checked here).
            if let Some(req) = &tool_request {
                if may_serve {
                    let socket = crate::serve::socket_path(&store_dir(&cli)?);
                    let id = snap.id.to_string();
                    if let Some(code) =
                        crate::serve::client::run(&socket, &id, a.display_stats, Some(req.clone()))?
                    {
                        return Ok(code);
                    }
                }
            }
            let (recorded, listeners) = if given_listeners {
                let recorded = crate::fds::inet::recorded_listeners(&snap.manifest);
                let given = crate::fds::inet::replacements(&recorded, &a.listen, systemd)?;
                (recorded, given)
            } else {
                (Vec::new(), Vec::new())
            };
            // A daemon serves an instance given its listeners too: they go with the stdio
            // (the snapshot's other listeners bound at their recorded addresses).
            if given_listeners && tool_request.is_none() && may_serve {
                let socket = crate::serve::socket_path(&store_dir(&cli)?);
                let all = crate::fds::inet::complete(&recorded, &listeners)?;
                let fds: Vec<_> = all
                    .iter()
                    .map(|(_, fd)| std::os::fd::AsFd::as_fd(&**fd))
                    .collect();
                let id = snap.id.to_string();
                if let Some(code) = crate::serve::client::run_with_listeners(
                    &socket,
                    &id,
                    a.display_stats,
                    None,
                    &fds,
                )? {
                    return Ok(code);
                }
            }
            let code = crate::run::run_instance_with(
                snap,
                names,
                mode,
                false,
                a.display_stats,
                crate::run::Given {
                    listeners,
                    tool_request,
                    cgroups,
                    tcp_established: false,
                    veths: Vec::new(),
                },
            );
            // The rest of a registry snapshot lands in the store (the next run is local).
            if let Some(h) = puller {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let abandoned = e.chain().any(|c| {
                            matches!(
                                c.downcast_ref::<warmstart_snapshots::store::StoreError>(),
                                Some(warmstart_snapshots::store::StoreError::PageReadsAbandoned { .. })
                            )
                        });
                        if abandoned {
                            eprintln!(
                                "warmstart: {} was not kept in the store: the instance ended \
                                 before all of its pages were fetched (`warmstart pull {}` \
                                 stores it)",
                                a.snapshot, a.snapshot
                            )
                        } else {
                            eprintln!(
                                "warmstart: {} was not kept in the store: {}",
                                a.snapshot,
                                crate::report::error_line(&e)
                            )
                        }
                    }
                    Err(p) => std::panic::resume_unwind(p),
                }
            }
            code
        }
    }
}

fn ls(list: &[warmstart_snapshots::store::SnapshotInfo], json: bool) -> Result<i32> {
    // Newest first.
    let mut list: Vec<_> = list.iter().collect();
    list.sort_by_key(|s| std::cmp::Reverse((s.created_unix, s.committed, s.id)));
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|s| {
                json!({
                    "id": s.id.to_string(), "names": s.names, "created_unix": s.created_unix,
                    "command": s.command, "logical_bytes": s.logical_bytes,
                    "resident_bytes": s.resident_pages * 4096, "zero_bytes": s.zero_pages * 4096,
                    "stored_bytes": s.stored_bytes,
                    "damaged": s.damaged, "unreadable": s.unreadable,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "{:<12}  {:<16}  {:<14}  {:>10}  {:>10}  {:>10}  COMMAND",
        "ID", "NAME", "CREATED", "LOGICAL", "RESIDENT", "STORED"
    );
    for s in list {
        let cmd = match (&s.damaged, &s.unreadable) {
            (Some(d), _) => format!("DAMAGED: {d}"),
            (None, Some(u)) => format!("UNREADABLE: {u}"),
            (None, None) => s.command.join(" "),
        };
        println!(
            "{:<12}  {:<16}  {:<14}  {:>10}  {:>10}  {:>10}  {cmd}",
            s.id.short(),
            s.names.join(","),
            age(now, s.created_unix),
            human(s.logical_bytes),
            human(s.resident_pages * 4096),
            human(s.stored_bytes)
        );
    }
    Ok(0)
}

/// How long ago `then` was, as `ls` shows it (`5 minutes ago`).
fn age(now: u64, then: u64) -> String {
    if then == 0 {
        return "-".into();
    }
    let secs = now.saturating_sub(then);
    let (n, unit) = match secs {
        0..=59 => return "just now".into(),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        86_400..=2_591_999 => (secs / 86_400, "day"),
        _ => (secs / 2_592_000, "month"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn vma_kind(k: &VmaKind) -> String {
    match k {
        VmaKind::Anon { name } if name.is_empty() => "anon".into(),
        VmaKind::Anon { name } => name.clone(),
        VmaKind::File { file } => file.path.clone(),
        VmaKind::Shmem { id } => format!("shared anon {id}"),
        VmaKind::Vdso => "[vdso]".into(),
        VmaKind::Vvar => "[vvar]".into(),
        VmaKind::VvarVclock => "[vvar_vclock]".into(),
        VmaKind::Vsyscall => "[vsyscall]".into(),
        VmaKind::SharedFile { id } => format!("deleted file / memfd #{id}"),
        VmaKind::SysvShm { shmid, writable } => format!(
            "System V shm {shmid}{}",
            if *writable { "" } else { " (read-only attach)" }
        ),
    }
}

fn fd_kind(f: &FileDesc) -> String {
    match f {
        FileDesc::Regular { file, pos, .. } => format!("file {} @{pos}", file.path),
        FileDesc::Directory { path, .. } => format!("dir {path}"),
        FileDesc::CharDev { path, .. } => format!("chr {path}"),
        FileDesc::Pipe { pipe, write, .. } => {
            format!("pipe:[{pipe}] {}", if *write { "w" } else { "r" })
        }
        other => crate::fds::describe(other),
    }
}

fn inspect(store: &Store, which: &str, json: bool) -> Result<i32> {
    let id = store.resolve(which)?;
    let snap = store.load(&id)?;
    let st = store.stats(&id)?;
    let m: &Manifest = &snap.manifest;
    if json {
        let v = json!({
            "id": id.to_string(),
            "stats": {
                "logical_bytes": st.logical_bytes, "resident_bytes": st.resident_pages * 4096,
                "zero_bytes": st.zero_pages * 4096, "data_bytes": st.data_pages * 4096,
                "working_set_pages": store.working_set(&id).map(|w| w.len()),
                // Per process (pid in the snapshot); `null` for a working set learned as
                // one list (before trees learned per process).
                "working_set_by_pid": match store.working_sets(&id) {
                    Some(warmstart_snapshots::store::WorkingSets::PerProcess(m)) => Some(
                        m.iter()
                            .map(|(p, w)| (p.to_string(), w.len()))
                            .collect::<std::collections::BTreeMap<_, _>>(),
                    ),
                    _ => None,
                },
                "stored_bytes": st.stored_bytes, "shared_pages_with_others": st.shared_with_others,
            },
            "manifest": m,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("snapshot {id}");
    println!("  command:  {}", m.command.join(" "));
    println!("  trigger:  {}", m.trigger);
    match store.working_set(&id) {
        Some(ws) => {
            println!(
                "  working set: {} pages ({}), prefetched by lazy runs",
                ws.len(),
                human(ws.len() as u64 * 4096)
            );
            if let Some(warmstart_snapshots::store::WorkingSets::PerProcess(m)) =
                store.working_sets(&id)
            {
                if m.len() > 1 {
                    let per: Vec<String> =
                        m.iter().map(|(p, w)| format!("{p}: {}", w.len())).collect();
                    println!("    per process (pid: pages): {}", per.join(", "));
                }
            }
        }
        None => println!("  working set: not learned yet (the next lazy `run` learns it)"),
    }
    println!(
        "  kernel:   {}  xsave {} bytes, XCR0 {:#x}",
        m.host.kernel_release, m.host.xsave_size, m.host.xsave_features
    );
    if let Some(b) = &m.host.cpu_baseline {
        println!(
            "  cpu baseline: {b} (recorded with --cpu-baseline: CPUID showed the app only \
             that level's features)"
        );
    }
    println!(
        "  needs:    a CPU with {} (`warmstart check --snapshot` tells whether this host \
         has them)",
        m.host.cpu_features.join(" ")
    );
    println!(
        "  memory:   logical {}, resident {}, zero {}, stored {} (compressed), {} pages shared with other snapshots",
        human(st.logical_bytes),
        human(st.resident_pages * 4096),
        human(st.zero_pages * 4096),
        human(st.stored_bytes),
        st.shared_with_others
    );
    let ns = &m.namespaces;
    if let Some(u) = &ns.uts {
        println!(
            "  uts namespace: host name {:?}, domain name {:?}",
            u.hostname, u.domainname
        );
    }
    if let Some(i) = &ns.ipc {
        println!(
            "  ipc namespace: {} shm segment(s), {} semaphore set(s), {} message queue(s)",
            i.shm.len(),
            i.sem.len(),
            i.msg.len()
        );
    }
    if let Some(n) = &ns.net {
        println!(
            "  net namespace: lo {}, {} address(es), {} route(s)",
            if n.lo_up { "up" } else { "down" },
            n.addrs.len(),
            n.routes.len()
        );
        for v in &n.veths {
            println!(
                "    veth {} (index {}, mtu {}, {}, {} address(es)), peer {}",
                v.name,
                v.index,
                v.mtu,
                if v.up { "up" } else { "down" },
                v.addrs.len(),
                if v.peer.is_empty() {
                    "outside warmstart's namespace (restore --veth NAME=HOSTNAME)"
                } else {
                    &v.peer
                }
            );
        }
        if !n.sysctls.is_empty() {
            println!("    {} sysctl(s) changed by the app", n.sysctls.len());
        }
    }
    for p in &m.processes {
        if let Some(status) = p.zombie {
            println!(
                "  process {} ({}) ppid {} {}, zombie (wait status {status:#x})",
                p.pid,
                p.comm,
                p.ppid,
                group_and_session(p.pgid, p.sid)
            );
            continue;
        }
        println!(
            "  process {} ({}) ppid {} {}, {} thread(s), exe {}",
            p.pid,
            p.comm,
            p.ppid,
            group_and_session(p.pgid, p.sid),
            p.threads.len(),
            p.exe.path
        );
        println!("    vmas: {}", p.vmas.len());
        for v in &p.vmas {
            let (mut data, mut zero) = (0, 0);
            for r in &v.pages {
                match r.content {
                    RunContent::Data { .. } => data += r.count,
                    RunContent::Zero => zero += r.count,
                }
            }
            let prot = format!(
                "{}{}{}{}",
                if v.prot & 1 != 0 { 'r' } else { '-' },
                if v.prot & 2 != 0 { 'w' } else { '-' },
                if v.prot & 4 != 0 { 'x' } else { '-' },
                if v.shared { 's' } else { 'p' }
            );
            println!(
                "      {:012x}-{:012x} {prot} {:>10}  data {:>6}  zero {:>6}  {}",
                v.start,
                v.end,
                human(v.len()),
                data,
                zero,
                vma_kind(&v.kind)
            );
        }
        println!("    fds:");
        for f in &p.fds {
            println!(
                "      {:>4}{} {}",
                f.fd,
                if f.cloexec { " (cloexec)" } else { "" },
                fd_kind(&f.file)
            );
        }
    }
    Ok(0)
}

/// A process's group and session as `inspect` shows them: 0 is one that belongs to a
/// process outside the snapshot's pid namespace (inherited from whoever started the app).
fn group_and_session(pgid: i32, sid: i32) -> String {
    const OUTSIDE: &str = "inherited from outside the tree";
    match (pgid, sid) {
        (0, 0) => format!("process group and session {OUTSIDE}"),
        (0, s) => format!("process group {OUTSIDE}, sid {s}"),
        (g, 0) => format!("pgid {g}, session {OUTSIDE}"),
        (g, s) => format!("pgid {g} sid {s}"),
    }
}

fn verify(store: &Store, which: Option<&str>) -> Result<i32> {
    let id = which.map(|w| store.resolve(w)).transpose()?;
    let progress = crate::progress::Bytes::new("verifying", None);
    // Pages done of the snapshot being read (its index, count).
    let mut at = (0, 0);
    let r = store.verify_progress(id.as_ref(), &mut |p| {
        if p.index != at.0 {
            at = (p.index, 0);
        }
        progress.inc(p.pages_done.saturating_sub(at.1) * 4096);
        at.1 = p.pages_done;
    })?;
    drop(progress);
    for d in &r.damaged {
        eprintln!("snapshot {} is damaged:", d.id.short());
        for reason in &d.reasons {
            eprintln!("  {reason}");
        }
    }
    for d in &r.unreadable {
        eprintln!(
            "snapshot {} could not be fully verified (permission denied):",
            d.id.short()
        );
        for reason in &d.reasons {
            eprintln!("  {reason}");
        }
    }
    if r.is_ok() {
        println!(
            "ok: {} snapshot(s), {} page(s) verified",
            r.snapshots_checked, r.pages_checked
        );
        Ok(0)
    } else {
        let mut line = format!(
            "{} of {} snapshot(s) damaged",
            r.damaged.len(),
            r.snapshots_checked
        );
        if !r.unreadable.is_empty() {
            line += &format!(
                ", {} with files this user may not read (permission denied)",
                r.unreadable.len()
            );
        }
        eprintln!("{line}");
        Ok(1)
    }
}

fn dump_cmd(cli: &Cli, a: &DumpArgs, pre: bool) -> Result<i32> {
    crate::check::require_privileges("dump")?;
    a.tls.only_with(&a.page_server)?;
    if a.pid <= 0 || !std::path::Path::new(&format!("/proc/{}", a.pid)).exists() {
        bail!("no such process: {}", a.pid);
    }
    // CRIU's --prev-images-dir: the previous image directory and its one snapshot.
    let prev_dir = match (&a.prev_images_dir, &a.dir) {
        (Some(p), Some(dir)) => {
            // Relative to the -D directory, which may not exist yet: joined lexically.
            let path = if p.is_relative() {
                join_lexically(dir, p)
            } else {
                p.clone()
            };
            let store = Store::open_existing(&path)
                .with_context(|| format!("--prev-images-dir {}", p.display()))?;
            let id = store.only_snapshot().with_context(|| {
                format!(
                    "--prev-images-dir {}: no single pre-dump there",
                    p.display()
                )
            })?;
            Some((store, id))
        }
        _ => None,
    };
    let dump = |dest: dump::Destination<'_>| -> Result<i32> {
        let prev = match (&a.prev, dest) {
            (None, _) => prev_dir.as_ref().map(|(_, id)| *id),
            (Some(q), dump::Destination::Store(s)) => {
                Some(s.resolve(q).with_context(|| format!("--prev {q}"))?)
            }
            (Some(q), dump::Destination::PageServer(addr, tls)) => Some(
                warmstart_snapshots::remote::Client::connect_tls(
                    addr,
                    warmstart_snapshots::remote::IO_TIMEOUT,
                    tls,
                )?
                .resolve(q)
                .with_context(|| format!("--prev {q} on page server {addr}"))?,
            ),
        };
        let prev = prev.as_ref().map(|id| dump::Prev {
            id,
            dir: prev_dir.as_ref().map(|(s, _)| s),
        });
        if pre {
            let r = dump::predump::pre_dump(a.pid, dest, prev, a.name.as_deref())?;
            let stats = a.display_stats.then_some((&r.phases, r.frozen, r.counts));
            return Ok(print_dumped("pre-dump", a.pid, &r.id, stats));
        }
        let r = dump::dump_after(
            a.pid,
            None,
            dest,
            &DumpOptions {
                leave_running: a.leave_running,
                keep_traced: false,
                leave_stopped: a.leave_stopped,
                stdio: StdioPolicy::Detect {
                    shell_job: a.shell_job,
                },
                tcp_close: a.tcp_close,
                tcp_established: a.tcp_established,
                trigger: "dump".into(),
                command: cmdline(a.pid),
                name: a.name.clone(),
                own_seccomp_filters: 0,
                private_tmp: false,
                tool: None,
                manage_cgroups: a.manage_cgroups,
                cpu_baseline: None,
            },
            prev,
        )?;
        let stats = a.display_stats.then_some((&r.phases, r.frozen, r.counts));
        Ok(print_dumped("dump", a.pid, &r.id, stats))
    };
    if let Some(addr) = &a.page_server {
        let tls = a.tls.client()?;
        return dump(dump::Destination::PageServer(addr, tls.as_ref()));
    }
    match &a.dir {
        Some(dir) => with_new_store(dir, |s| {
            if !s.ids()?.is_empty() {
                bail!(
                    "image directory {} already holds a snapshot: use an empty directory",
                    dir.display()
                );
            }
            if let Some((from, _)) = &prev_dir {
                // Before the freeze: the pages the pre-dump holds become this image's.
                s.adopt_packs(from)
                    .with_context(|| format!("linking the pages of {}", from.dir().display()))?;
            }
            dump(dump::Destination::Store(s))
        }),
        None => with_new_store(&store_dir(cli)?, |s| {
            let old = a.name.as_deref().and_then(|n| name_target(s, n));
            let code = dump(dump::Destination::Store(s))?;
            report_moved_name(s, a.name.as_deref(), old);
            Ok(code)
        }),
    }
}

/// `base/rel` with the `..` and `.` of `rel` taken off `base` as text (`a/b` + `../c` is
/// `a/c`), so that `base` need not exist.
fn join_lexically(base: &std::path::Path, rel: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The command line of process `pid` (empty if it cannot be read).
/// Prints a dump's id (stdout) and, with `--display-stats`, its phases, frozen time and
/// page counts (stderr); the exit code.
fn print_dumped(
    what: &str,
    pid: i32,
    id: &warmstart_snapshots::store::SnapshotId,
    stats: Option<(
        &crate::stats::Phases,
        std::time::Duration,
        dump::track::Counts,
    )>,
) -> i32 {
    if let Some((phases, frozen, counts)) = stats {
        eprintln!(
            "{what} of {pid}:\n{phases}\n  frozen for {:.3} ms; pages read {}, taken from the previous image {}",
            frozen.as_secs_f64() * 1e3,
            counts.read,
            counts.taken
        );
    }
    println!("{}", id.short());
    0
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The snapshot `name` points to in `store`, if any.
fn name_target(store: &Store, name: &str) -> Option<warmstart_snapshots::store::SnapshotId> {
    store
        .names()
        .ok()?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| id)
}

/// After a snapshot was stored under `name`: if the name pointed to another snapshot
/// (`old`) before, says which one lost it.
fn report_moved_name(
    store: &Store,
    name: Option<&str>,
    old: Option<warmstart_snapshots::store::SnapshotId>,
) {
    let (Some(name), Some(old)) = (name, old) else {
        return;
    };
    match name_target(store, name) {
        Some(new) if new != old => eprintln!(
            "warmstart: name `{name}` now points to snapshot {}; snapshot {} lost it (it \
             is kept under its id: `warmstart rm {}` removes it)",
            new.short(),
            old.short(),
            old.short()
        ),
        _ => {}
    }
}

fn restore_cmd(cli: &Cli, a: &RestoreArgs) -> Result<i32> {
    crate::check::require_privileges("restore")?;
    a.tls.only_with(&a.page_server)?;
    let (snap, names) = match (&a.dir, &a.snapshot, &a.page_server) {
        (Some(dir), _, _) => {
            if !dir.is_dir() {
                bail!("image directory {} does not exist", dir.display());
            }
            let s = Store::open_existing(dir)?;
            let id = image_dir_snapshot(&s, dir)?;
            // `ps` names the instance by its image directory.
            let name = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            (s.load(&id)?, vec![name.display().to_string()])
        }
        (None, Some(snap), Some(addr)) => (
            Snapshot::connect_tls(
                addr,
                snap,
                Duration::from_secs(a.page_server_timeout),
                a.tls.client()?.as_ref(),
            )?,
            Vec::new(),
        ),
        (None, Some(snap), None) => load(&open_store_ro(cli)?, snap)?,
        (None, None, _) => bail!("name a snapshot or pass -D DIR"),
    };
    let mode = if a.lazy {
        Mode::Lazy { prefetch: true }
    } else {
        Mode::Eager
    };
    let cgroups = if a.manage_cgroups {
        crate::run::Cgroups::Manage {
            root: a.cgroup_root.clone(),
        }
    } else {
        crate::run::Cgroups::Inherit
    };
    crate::run::run_instance_with(
        Arc::new(snap),
        names,
        mode,
        a.detach,
        a.display_stats,
        crate::run::Given {
            cgroups,
            tcp_established: a.tcp_established,
            veths: a.veth.clone(),
            ..Default::default()
        },
    )
}

/// The one restorable snapshot of image directory `dir` (store `s`). Pre-dumps beside it
/// (a `page-server -D` receiving a live migration keeps them until the final dump has
/// come, and removes them just after) are passed over.
fn image_dir_snapshot(s: &Store, dir: &std::path::Path) -> Result<SnapshotId> {
    let ids = s.ids()?;
    if ids.len() <= 1 {
        return Ok(s.only_snapshot()?);
    }
    let pre = |id: &SnapshotId| {
        s.manifest(id)
            .is_ok_and(|m| m.trigger == crate::dump::predump::TRIGGER)
    };
    let (pre, rest): (Vec<SnapshotId>, Vec<SnapshotId>) = ids.into_iter().partition(pre);
    let short = |v: &[SnapshotId]| v.iter().map(|i| i.short()).collect::<Vec<_>>().join(", ");
    match rest.len() {
        1 => Ok(rest[0]),
        0 => bail!(
            "image directory {} holds only pre-dumps ({}), which cannot be restored: restore \
             it once the final `dump --prev` has gone into it",
            dir.display(),
            short(&pre)
        ),
        _ => Ok(s.only_snapshot()?),
    }
}

/// Loads snapshot `which` (id, prefix or name) of `store`, with the names it has there,
/// for a restore: its page table is checked while restoring (`Store::load_deferred`).
fn load(store: &Store, which: &str) -> Result<(Snapshot, Vec<String>)> {
    let id = store.resolve(which)?;
    let names = store
        .names()?
        .into_iter()
        .filter(|(_, i)| *i == id)
        .map(|(n, _)| n)
        .collect();
    Ok((store.load_deferred(&id)?, names))
}

fn record_cmd(cli: &Cli, a: &RecordArgs) -> Result<i32> {
    // The parse error names `--ready` and the value already.
    let ready: warmstart_launcher::Ready = a.ready.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::check::require_privileges("record")?;
    with_new_store(&store_dir(cli)?, |store| record_in(store, a, ready))
}

/// `record --uts --ipc --net private` as `CLONE_NEW*` flags.
fn record_namespaces(a: &RecordArgs) -> Result<u64> {
    let net = match a.net.as_str() {
        "host" => 0,
        "private" => libc::CLONE_NEWNET,
        other => bail!("--net {other}: the choices are `private` (a network namespace of the app's own, with a loopback) and `host`"),
    };
    let flag = |on: bool, f: i32| if on { f } else { 0 };
    Ok((net | flag(a.uts, libc::CLONE_NEWUTS) | flag(a.ipc, libc::CLONE_NEWIPC)) as u64)
}

fn record_in(store: &Store, a: &RecordArgs, mut ready: warmstart_launcher::Ready) -> Result<i32> {
    let (command, tool) = if a.tool {
        if a.ready != "stdin" || !a.prime.is_empty() {
            anyhow::bail!(
                "record --tool takes its snapshot at the tool's entry point: no --ready or \
                 --prime (use --prime-args)"
            );
        }
        ready = warmstart_launcher::Ready::Notify;
        let (cmd, info, _) = crate::tool::plan(&a.command, &a.prime_args, true)?;
        // SAFETY-free: set before any thread of ours starts; the launcher removes it.
        std::env::set_var(
            "WARMSTART_TOOL_PRIME",
            serde_json::to_string(&a.prime_args)?,
        );
        (cmd, Some(info))
    } else {
        (a.command.clone(), None)
    };
    // `--prime` is the path of an HTTP GET for a server, a line of input otherwise.
    let (prime, prime_http) = if ready == warmstart_launcher::Ready::Listen {
        (Vec::new(), a.prime.clone())
    } else {
        let lines = a.prime.iter().flat_map(|l| [l.as_bytes(), b"\n"].concat());
        (lines.collect(), Vec::new())
    };
    let old_target = a.name.as_deref().and_then(|n| name_target(store, n));
    let r = crate::record::record(
        store,
        &crate::record::RecordOptions {
            command,
            tool,
            name: a.name.clone(),
            ready,
            timeout: Duration::from_secs(a.timeout),
            tcp_close: a.tcp_close,
            tcp_established: a.tcp_established,
            leave_running: a.leave_running,
            prime,
            prime_http,
            share_tmp: a.share_tmp,
            reproducible: a.reproducible,
            namespaces: record_namespaces(a)?,
            cpu_baseline: a.cpu_baseline,
        },
        |d| {
            if a.display_stats {
                eprintln!("record:\n{}", d.phases);
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", d.id.short()).and_then(|()| out.flush());
            report_moved_name(store, a.name.as_deref(), old_target);
        },
    )?;
    Ok(match r.exit {
        None | Some(ExitStatus::Code(0)) => 0,
        Some(ExitStatus::Code(c)) => c,
        Some(ExitStatus::Signal(s)) => 128 + s,
    })
}

fn ps(json: bool) -> Result<i32> {
    let list = crate::instances::list()?;
    if json {
        // With its usage from its own cgroup (`run --memory/--cpus/--pids`; null without).
        let mut out = Vec::new();
        for i in &list {
            let (mem, cpu) = crate::cgroup::usage(&i.cgroups);
            let mut v = serde_json::to_value(i)?;
            v["memory_bytes"] = mem.into();
            v["cpu_usec"] = cpu.into();
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "{:>8}  {:>8}  {:<12}  {:<16}  {:>9}  {:>8}  COMMAND",
        "PID", "MONITOR", "SNAPSHOT", "NAME", "MEM", "CPU"
    );
    let (templates, instances): (Vec<_>, Vec<_>) = list.into_iter().partition(|i| i.template);
    for i in instances {
        // From the instance's own cgroup; "-" for one without.
        let (mem, cpu) = crate::cgroup::usage(&i.cgroups);
        println!(
            "{:>8}  {:>8}  {:<12}  {:<16}  {:>9}  {:>8}  {}",
            i.pid,
            i.monitor,
            &i.snapshot[..12.min(i.snapshot.len())],
            i.names.join(","),
            mem.map(crate::stats::human).unwrap_or_else(|| "-".into()),
            cpu.map(|us| format!("{:.2}s", us as f64 / 1e6))
                .unwrap_or_else(|| "-".into()),
            i.command.join(" ")
        );
    }
    if !templates.is_empty() {
        println!("\nTEMPLATES (the restored memory a serve daemon's instances share)");
        println!(
            "{:>8}  {:>8}  {:<12}  COMMAND",
            "PID", "MONITOR", "SNAPSHOT"
        );
        for i in templates {
            println!(
                "{:>8}  {:>8}  {:<12}  {}",
                i.pid,
                i.monitor,
                &i.snapshot[..12.min(i.snapshot.len())],
                i.command.join(" ")
            );
        }
    }
    Ok(0)
}
