//! One restored instance from the command line (`run`, `restore`): restore it, list it
//! for `ps`, wait for it, keep the working set its first lazy run learned, report stats.
//! The snapshot may be local or a page server's: [`Snapshot`] hides which.

use std::sync::Arc;

use anyhow::Result;
use warmstart_snapshots::store::Snapshot;

use crate::cgroup::Placement;
use crate::restore::RestoreOptions;
use crate::stats::human;

/// How an instance gets its memory.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Eager,
    /// On demand; `prefetch`: copy the learned working set first (or learn it).
    Lazy {
        prefetch: bool,
    },
}

/// Restores one instance of `snap` (known by `names` in its store) and waits for it,
/// returning its exit code; `detach`: report its pid and return once it runs.
pub fn run_instance(
    snap: Arc<Snapshot>,
    names: Vec<String>,
    mode: Mode,
    detach: bool,
    display_stats: bool,
    cgroups: Cgroups,
) -> Result<i32> {
    let given = Given {
        cgroups,
        ..Default::default()
    };
    run_instance_with(snap, names, mode, detach, display_stats, given)
}

/// Which cgroups an instance goes into.
#[derive(Debug, Clone, Default)]
pub enum Cgroups {
    /// Where `warmstart` is.
    #[default]
    Inherit,
    /// The snapshot's own (`restore --manage-cgroups [--cgroup-root DIR]`).
    Manage { root: Option<String> },
    /// One of its own with limits (`run --memory/--cpus/--pids`), removed when it ends.
    Limits(crate::cgroup::Limits),
}

/// The cgroups of an instance of `snap`: where its processes go, and (with limits) the
/// instance's own cgroup directories, for `ps`.
fn place(
    snap: &Snapshot,
    cgroups: &Cgroups,
) -> Result<Option<(Arc<Placement>, Vec<std::path::PathBuf>)>> {
    match cgroups {
        Cgroups::Inherit => Ok(None),
        Cgroups::Manage { root } => {
            let Some(c) = &snap.manifest.cgroups else {
                anyhow::bail!(
                    "snapshot {} was dumped without --manage-cgroups: it holds no cgroups to \
                     restore; restore it without --manage-cgroups (or dump again with it)",
                    snap.id.short()
                );
            };
            let p = Placement::prepare(c, snap.manifest.processes.len(), root.as_deref())?;
            Ok(Some((Arc::new(p), Vec::new())))
        }
        Cgroups::Limits(l) => {
            let (p, dirs) = Placement::for_instance(l)?;
            Ok(Some((Arc::new(p), dirs)))
        }
    }
}

/// With limits: an instance the OOM killer killed (while restoring or running) ends as a
/// cold start in that cgroup would, with 128+SIGKILL, saying so.
fn oom_killed(placement: Option<&Arc<Placement>>, cgroups: &Cgroups) -> bool {
    let (Some(p), Cgroups::Limits(l)) = (placement, cgroups) else {
        return false;
    };
    if p.oom_kills() == 0 {
        return false;
    }
    eprintln!(
        "warmstart: the instance was killed by the OOM killer: it reached its memory limit \
         ({})",
        l.memory
            .map(human)
            .unwrap_or_else(|| "of its cgroup".into())
    );
    true
}

/// What an instance gets beyond its snapshot (`run`'s options).
#[derive(Debug, Default)]
pub struct Given {
    /// Listening sockets in place of the ones it recorded
    /// ([`crate::fds::inet::replacements`]).
    pub listeners: Vec<(u32, Arc<std::os::fd::OwnedFd>)>,
    /// A tool snapshot's request ([`crate::tool::request`]).
    pub tool_request: Option<Vec<u8>>,
    pub cgroups: Cgroups,
    /// `restore --tcp-established`: bring back the snapshot's established connections.
    pub tcp_established: bool,
    /// `restore --veth`: where the new peers of the snapshot's veths go.
    pub veths: Vec<crate::restore::namespaces::VethMap>,
}

/// [`run_instance`], the instance getting what `given` says.
pub fn run_instance_with(
    snap: Arc<Snapshot>,
    names: Vec<String>,
    mode: Mode,
    detach: bool,
    display_stats: bool,
    given: Given,
) -> Result<i32> {
    let Given {
        listeners,
        tool_request,
        cgroups,
        tcp_established,
        veths,
    } = given;
    crate::restore::block_forwarded_signals();
    let placed = place(&snap, &cgroups)?;
    let (placement, cgroup_dirs) = match placed {
        Some((p, d)) => (Some(p), d),
        None => (None, Vec::new()),
    };
    // The snapshot may come from `Store::load_deferred` (cli::load): check its page
    // table while restoring (a fully loaded one passes again, at no cost to the restore).
    let mut opts = RestoreOptions {
        verify_table: true,
        listeners,
        tool_request,
        cgroups: placement.clone(),
        tcp_established,
        veths,
        ..Default::default()
    };
    if let Mode::Lazy { prefetch } = mode {
        opts.lazy = true;
        if prefetch {
            opts.prefetch = snap.working_sets();
            // Learning needs our stdout to watch for the first answer: not when detached.
            opts.learn = opts.prefetch.is_none() && !detach;
        }
    }
    let registered = |pid: i32| {
        crate::instances::register(&crate::instances::Instance {
            monitor: std::process::id() as i32,
            pid,
            snapshot: snap.id.to_string(),
            names: names.clone(),
            command: command_of(&snap.manifest),
            started_unix: crate::instances::unix_now(),
            client: None,
            template: false,
            cgroups: cgroup_dirs.clone(),
        })
        .map_err(|e| tracing::warn!("instance not listed by `warmstart ps`: {e:#}"))
        .ok()
    };
    if detach {
        return crate::restore::detached(&snap, &opts, display_stats, &registered);
    }
    // Until the instance runs, SIGINT/SIGTERM/SIGHUP stop the restore (and kill what
    // was built of it); from then on they are forwarded to the instance, as are the
    // other relayed signals (blocked above, pending until then).
    crate::restore::reserve_fds(&snap.manifest);
    let watch = crate::restore::interrupt::Watch::start()?;
    watch.interrupt.abandon_reads_of(snap.clone());
    opts.interrupt = Some(watch.interrupt.clone());
    // Listed by `ps` before it runs: anyone it answers finds it there.
    let restored = crate::restore::restore_listed(&snap, &opts, &registered);
    let interrupt = watch.interrupt.clone();
    let signal = watch.stop();
    // A signal that came once the instance resumed is the instance's: forwarded below.
    let for_instance = restored.is_ok() && interrupt.resumed();
    if let (Some(sig), false) = (signal, for_instance) {
        drop(restored);
        eprintln!(
            "warmstart: the restore of snapshot {} was interrupted by {}; nothing of the \
             instance is left running",
            snap.id.short(),
            crate::restore::signal_name(sig)
        );
        return Ok(128 + sig);
    }
    let (r, _listed) = match restored {
        Ok(r) => r,
        Err(_) if oom_killed(placement.as_ref(), &cgroups) => return Ok(128 + libc::SIGKILL),
        Err(e) => return Err(e),
    };
    if let (Some(p), Cgroups::Manage { .. }) = (&placement, &cgroups) {
        p.keep();
    }
    if let Some(sig) = signal {
        if let Err(e) = r.sandbox.signal(sig) {
            tracing::warn!(
                "forwarding {} to the instance: {e}",
                crate::restore::signal_name(sig)
            );
        }
    }
    if display_stats {
        let from = snap
            .page_server()
            .map(|a| format!(" from page server {a}"))
            .unwrap_or_default();
        eprintln!("restore of {}{from}:\n{}", snap.id.short(), r.phases);
    }
    // Once the instance is over, nothing waits for a page server's answers any more (one
    // that stopped answering must not hold `run` up).
    let (code, lazy) = match r.wait_then(|| snap.abandon_page_reads()) {
        Ok(x) => x,
        Err(_) if oom_killed(placement.as_ref(), &cgroups) => return Ok(128 + libc::SIGKILL),
        Err(e) => return Err(e),
    };
    if code == 128 + libc::SIGKILL {
        oom_killed(placement.as_ref(), &cgroups);
    }
    if let Some(o) = lazy {
        if display_stats {
            eprintln!(
                "page server: {} pages prefetched ({} hot, {} batches) in {:.3} ms; {} faults served ({} with data, {} zero), \
                 {} pages on fault, {} streamed ({}), all memory in after {}, {}",
                o.prefetch.pages,
                o.prefetch.hot_pages,
                o.prefetch.batches,
                o.prefetch.elapsed.as_secs_f64() * 1e3,
                o.serve.faults,
                o.serve.faults_data,
                o.serve.faults_zero,
                o.serve.pages_on_fault,
                o.serve.pages_streamed,
                human(o.serve.bytes_streamed),
                o.serve
                    .complete_after
                    .map(|d| {
                        let rate = o.serve.stream_started.map_or(String::new(), |s| {
                            let secs = d.saturating_sub(s).as_secs_f64().max(1e-9);
                            format!(
                                " (streamed at {:.2} GB/s from its first batch at {:.1} ms)",
                                o.serve.bytes_streamed as f64 / secs / 1e9,
                                s.as_secs_f64() * 1e3
                            )
                        });
                        format!("{:.1} ms{rate}", d.as_secs_f64() * 1e3)
                    })
                    .unwrap_or_else(|| "– (the instance ended first)".into()),
                if opts.learn {
                    format!("working set learned: {} pages", o.serve.working_set.len())
                } else if opts.prefetch.is_some() {
                    "working set: kept from an earlier run".into()
                } else {
                    "working set: not used (--no-prefetch)".into()
                },
            );
        }
    }
    Ok(code)
}

/// The command `ps` shows for an instance of `m`: the recorded one, or for a dump that
/// has none, the name of its root process.
pub(crate) fn command_of(m: &warmstart_snapshots::model::Manifest) -> Vec<String> {
    // A tool's: the command as recorded, not its launcher's.
    if let Some(t) = m.tool.as_ref().filter(|t| !t.command.is_empty()) {
        return t.command.clone();
    }
    if !m.command.is_empty() {
        return m.command.clone();
    }
    m.processes
        .first()
        .map(|p| vec![p.comm.clone()])
        .unwrap_or_default()
}
