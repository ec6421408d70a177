//! Copy-on-write sharing between the processes of a tree (issue 13): pages a parent and
//! the children it forked shared at the dump are one physical page again after the
//! restore, not one copy per process.
//!
//! The kernel shares private anonymous pages between processes only through `fork`, so
//! the restore does what the app did: before a process of the tree forks its children
//! (in [`super::child`]), it maps each of its *shared areas* — a private anonymous VMA a
//! child inherited at the same place — and writes into it the pages its descendants
//! still share with it; the children inherit them by the fork, at the same addresses.
//! A child *adopts* its part of its parent's area where its own VMA lies inside it
//! (extensions after a fork are VMAs of their own, see `vma_had_uncowed_parents` in the
//! kernel's `mm/vma.c`, so a VMA a child inherited never outgrows its parent's), writes
//! the pages its own children need where they differ, and so on down the tree. The
//! restorer program then moves each area where its VMA belongs (`mremap`, when it could
//! not be mapped there from the start) instead of mapping fresh memory, and the eager
//! fill leaves alone every page that is already this process's own content.
//!
//! What is shared is decided by content, as CRIU does: a page is shared again when
//! parent and child hold the same bytes (equal blake3) at the same address inside an
//! inherited area. Pages whose contents were written by both after the fork stay
//! separate copies. Shared areas are restored eagerly (a page already present never
//! faults, so it cannot be served lazily anyway).
//!
//! This module only plans (in the monitor, before the tree is cloned): which areas, the
//! pages each process writes before it forks (their bytes go to one memfd the tree
//! inherits), and for the eager fill which pages to skip or zero.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use warmstart_snapshots::model::{Manifest, Process, RunContent, Vma, VmaKind, PAGE_SIZE};
use warmstart_snapshots::store::Snapshot;

const PAGE: u64 = PAGE_SIZE as u64;

/// A shared area of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    /// What the area is mapped from, as the VMA was.
    pub backing: Backing,
    /// Index into the parent's areas of the one this lies inside (adopted), or `None`
    /// (mapped new by this process).
    pub adopt: Option<usize>,
    /// Written before forking: `(addr, pages, memfd offset)`, page contents in the memfd.
    pub writes: Vec<(u64, u64, u64)>,
    /// Pages (addresses) the area holds with exactly this process's content: the eager
    /// fill skips them. Sorted.
    pub own: Vec<u64>,
    /// Pages the area holds (inherited) where this process has none or a zero page: the
    /// eager fill zeroes them. Sorted.
    pub zero: Vec<u64>,
}

/// What a shared area is mapped from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// `MAP_NORESERVE`.
    pub noreserve: bool,
    /// A private mapping of this file at this offset (its written pages are anonymous
    /// copies, shared as the rest), else anonymous memory.
    pub file: Option<(String, u64)>,
}

impl Area {
    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }
}

/// The plan of a tree: per process (manifest order) its shared areas.
#[derive(Debug)]
pub struct CowPlan {
    pub procs: Vec<Vec<Area>>,
    /// Every VMA of every process of the tree, sorted: a temporary place for an area
    /// lies outside all of them.
    pub avoid: Vec<(u64, u64)>,
    /// The bytes of every page in an area's `writes` (none for a template's plan).
    pub memfd: Option<OwnedFd>,
}

impl CowPlan {
    /// A copy (its memfd shared).
    pub fn try_clone(&self) -> Result<CowPlan> {
        Ok(CowPlan {
            procs: self.procs.clone(),
            avoid: self.avoid.clone(),
            memfd: self
                .memfd
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .context("dup of the shared pages' memfd")?,
        })
    }

    /// `(start, len)` of `idx`'s shared areas, sorted: restored eagerly.
    pub fn eager_ranges(&self, idx: usize) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.procs[idx]
            .iter()
            .map(|a| (a.start, a.size()))
            .collect();
        v.sort_unstable();
        v
    }
}

/// Whether `v` can be a shared area: private anonymous memory mapped with nothing an
/// `mremap` of a plain writable mapping would lose (growing down, locked). It is made
/// from a writable mapping, so it must have been writable once: accounted (`VM_ACCOUNT`),
/// or mapped `MAP_NORESERVE` (never accounted; V8's heap), which the area is mapped with
/// too. `MADV_DONTFORK`/`WIPEONFORK` areas (V8's heap again) qualify: the area is mapped
/// without the advice, so the restore's own forks carry it, and the restorer gives it
/// afterwards, as it does every VMA's advice, for the app's forks to come.
pub fn candidate(v: &Vma) -> bool {
    let kind = match v.kind {
        VmaKind::Anon { .. } => v.flags.accounted != v.flags.noreserve,
        // A private file mapping's written pages (a relocated CDS archive, `.data`).
        VmaKind::File { .. } => v.flags.accounted && !v.flags.noreserve,
        _ => false,
    };
    !v.shared && kind && !v.flags.growsdown && !v.flags.locked && !v.flags.lockonfault
}

/// A page's contents, as a number: pages with equal blake3 hashes have equal ones
/// ([`Contents`]). Comparing and hashing these is what the plan does most.
type Hash = u32;

/// Numbers page contents by their blake3 hash.
#[derive(Default)]
struct Contents(HashMap<[u8; 32], Hash, std::hash::BuildHasherDefault<DigestHasher>>);

impl Contents {
    fn id(&mut self, digest: [u8; 32]) -> Hash {
        let next = self.0.len() as Hash;
        *self.0.entry(digest).or_insert(next)
    }
}

/// blake3 digests are uniformly distributed: their first bytes are as good a hash as
/// any, and much cheaper than hashing all 32 again.
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        w[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(w);
    }
}

/// Page addresses as hash keys: their page number times an odd constant (Fibonacci
/// hashing), far cheaper than SipHash on what the plan looks up most.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, addr: u64) {
        self.0 = (addr >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<AddrHasher>>;
type AddrSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<AddrHasher>>;

/// One process's stored pages in candidate VMAs, sorted by address.
struct Pages(Vec<(u64, Page)>);

/// A stored page: its contents and page-table index.
#[derive(Clone, Copy)]
struct Page {
    hash: Hash,
    idx: u64,
}

impl Pages {
    fn get(&self, addr: u64) -> Option<Page> {
        self.0
            .binary_search_by_key(&addr, |&(a, _)| a)
            .ok()
            .map(|k| self.0[k].1)
    }

    /// The pages in `start..end`.
    fn range(&self, start: u64, end: u64) -> &[(u64, Page)] {
        let from = self.0.partition_point(|&(a, _)| a < start);
        let to = self.0.partition_point(|&(a, _)| a < end);
        &self.0[from..to.max(from)]
    }
}

/// One process's stored pages in candidate VMAs.
fn stored_pages(snap: &Snapshot, p: &Process, contents: &mut Contents) -> Pages {
    let mut out = Vec::new();
    let count = snap.page_count();
    for v in p.vmas.iter().filter(|v| candidate(v)) {
        for r in &v.pages {
            let RunContent::Data { first } = r.content else {
                continue;
            };
            let n = r.count.min(v.page_count().saturating_sub(r.page));
            for i in 0..n {
                let idx = first + i;
                if idx >= count {
                    break;
                }
                let hash = contents.id(snap.page_hash(idx));
                out.push((v.start + (r.page + i) * PAGE, Page { hash, idx }));
            }
        }
    }
    out.sort_unstable_by_key(|&(a, _)| a);
    Pages(out)
}

/// What `p`'s VMA `start..end` is mapped from.
pub fn backing_of(p: &Process, start: u64, end: u64) -> Backing {
    let v = p.vmas.iter().find(|v| v.start == start && v.end == end);
    Backing {
        noreserve: v.is_some_and(|v| v.flags.noreserve),
        file: v.and_then(|v| match &v.kind {
            VmaKind::File { file } => Some((file.path.clone(), v.offset)),
            _ => None,
        }),
    }
}

/// The candidate VMA of `p` holding `addr`.
fn vma_at(cands: &[(u64, u64)], addr: u64) -> Option<(u64, u64)> {
    let i = cands.partition_point(|&(_, e)| e <= addr);
    cands.get(i).copied().filter(|&(s, _)| s <= addr)
}

/// Plans the tree of `m`; `None` when nothing is shared (a lone process, or no page a
/// child still shares).
///
/// For a template ([`super::template`]) the root adopts every candidate area with stored
/// pages, all of them its own content, from the template, which holds them at the places
/// it reports (in the order of the root's areas); the rest of the tree as usual.
pub fn plan(snap: &Snapshot, m: &Manifest, template: bool) -> Result<Option<CowPlan>> {
    let n = m.processes.len();
    if n < 2 && !template {
        return Ok(None);
    }
    let live: Vec<bool> = m.processes.iter().map(|p| p.zombie.is_none()).collect();
    let children: Vec<Vec<usize>> = m
        .processes
        .iter()
        .map(|p| {
            (1..n)
                .filter(|&c| live[c] && m.processes[c].ppid == p.pid)
                .collect()
        })
        .collect();
    let cands: Vec<Vec<(u64, u64)>> = m
        .processes
        .iter()
        .zip(&live)
        .map(|(p, &l)| {
            let mut v: Vec<(u64, u64)> = if l {
                p.vmas
                    .iter()
                    .filter(|v| candidate(v))
                    .map(|v| (v.start, v.end))
                    .collect()
            } else {
                Vec::new()
            };
            v.sort_unstable();
            v
        })
        .collect();
    // Nothing to do unless some child has a candidate VMA inside one of its parent's.
    let any = (1..n).any(|c| {
        let Some(par) = m
            .processes
            .iter()
            .position(|q| q.pid == m.processes[c].ppid)
        else {
            return false;
        };
        cands[c]
            .iter()
            .any(|&(s, e)| vma_at(&cands[par], s).is_some_and(|(ps, pe)| ps <= s && e <= pe))
    });
    if !any && !template {
        return Ok(None);
    }
    // Sorted by address: every question below is about the pages of one area. (A
    // snapshot from a registry fetches the rest of its index for that.)
    snap.ensure_all_records()?;
    let mut contents = Contents::default();
    let pages: Vec<Pages> = m
        .processes
        .iter()
        .zip(&live)
        .map(|(p, &l)| {
            if l {
                stored_pages(snap, p, &mut contents)
            } else {
                Pages(Vec::new())
            }
        })
        .collect();

    // Bottom up: the pages each process would like its children and theirs (through
    // areas inside areas) to inherit with its own contents (`needed_at`), and what each
    // process with children and a parent would like to inherit from that parent: address
    // → the contents wanted there (a leaf's are its pages).
    let order = preorder(&children);
    let mut wants: Vec<AddrMap<Vec<Hash>>> = vec![AddrMap::default(); n];
    let mut needed_at: Vec<AddrSet> = vec![AddrSet::default(); n];
    for &i in order.iter().rev() {
        let pass_up = i != 0 && !children[i].is_empty();
        let mut w: AddrMap<Vec<Hash>> = AddrMap::default();
        let mut needed = AddrSet::default();
        for &c in &children[i] {
            let mut visit = |addr: u64, hs: &[Hash]| {
                let inside = vma_at(&cands[c], addr)
                    .zip(vma_at(&cands[i], addr))
                    .is_some_and(|((cs, ce), (s, e))| s <= cs && ce <= e);
                if !inside {
                    return;
                }
                if pages[i].get(addr).is_some_and(|p| hs.contains(&p.hash)) {
                    needed.insert(addr);
                }
                if pass_up {
                    let e = w.entry(addr).or_default();
                    for h in hs {
                        if !e.contains(h) {
                            e.push(*h);
                        }
                    }
                }
            };
            if children[c].is_empty() {
                for (addr, p) in &pages[c].0 {
                    visit(*addr, std::slice::from_ref(&p.hash));
                }
            } else {
                for (&addr, hs) in &wants[c] {
                    visit(addr, hs);
                }
            }
        }
        if pass_up {
            for (addr, p) in &pages[i].0 {
                let e = w.entry(*addr).or_default();
                if !e.contains(&p.hash) {
                    e.push(p.hash);
                }
            }
        }
        wants[i] = w;
        needed_at[i] = needed;
    }

    // Top down: each process's areas, with what they hold after its writes.
    let mut memfd_pages: Vec<u64> = Vec::new(); // page-table index per memfd page
    let mut at_offset: HashMap<Hash, u64> = HashMap::new();
    let mut procs: Vec<Vec<Area>> = vec![Vec::new(); n];
    let mut held: Vec<Vec<BTreeMap<u64, Hash>>> = vec![Vec::new(); n];
    for &i in &order {
        let parent = (i != 0)
            .then(|| {
                m.processes
                    .iter()
                    .position(|q| q.pid == m.processes[i].ppid)
            })
            .flatten();
        if template && i == 0 {
            for &(s, e) in &cands[0] {
                let state: BTreeMap<u64, Hash> = pages[0]
                    .range(s, e)
                    .iter()
                    .map(|(a, p)| (*a, p.hash))
                    .collect();
                if state.is_empty() {
                    continue;
                }
                let mut own: Vec<u64> = state.keys().copied().collect();
                own.sort_unstable();
                let k = procs[0].len();
                procs[0].push(Area {
                    start: s,
                    end: e,
                    backing: backing_of(&m.processes[0], s, e),
                    adopt: Some(k),
                    writes: Vec::new(),
                    own,
                    zero: Vec::new(),
                });
                held[0].push(state);
            }
            continue;
        }
        for &(s, e) in &cands[i] {
            let mine = |a: u64| pages[i].get(a).map(|x| x.hash);
            let backing = backing_of(&m.processes[i], s, e);
            // Pages a child (or further down) wants with this process's content (sorted).
            let needed: Vec<u64> = pages[i]
                .range(s, e)
                .iter()
                .map(|&(a, _)| a)
                .filter(|a| needed_at[i].contains(a))
                .collect();
            let inherited = parent.and_then(|par| {
                procs[par]
                    .iter()
                    .position(|a| {
                        a.start <= s
                            && e <= a.end
                            && a.backing.noreserve == backing.noreserve
                            // The same file, at the offset this part of it has.
                            && match (&a.backing.file, &backing.file) {
                                (None, None) => true,
                                (Some((f, o)), Some((g, p))) => f == g && o + (s - a.start) == *p,
                                _ => false,
                            }
                    })
                    .map(|k| (k, &held[par][k]))
            });
            let matches =
                inherited.is_some_and(|(_, st)| st.range(s..e).any(|(&a, h)| mine(a) == Some(*h)));
            // In a file mapping a page the process has not written reads from the file:
            // an inherited written page there could not be undone by a write.
            let revertible = backing.file.is_none()
                || inherited.is_some_and(|(_, st)| st.range(s..e).all(|(&a, _)| mine(a).is_some()));
            let (adopt, mut state) = match inherited {
                Some((k, st)) if matches && revertible => (
                    Some(k),
                    st.range(s..e)
                        .map(|(&a, &h)| (a, h))
                        .collect::<BTreeMap<u64, Hash>>(),
                ),
                _ if !needed.is_empty() => (None, BTreeMap::new()),
                _ => continue,
            };
            let mut writes: Vec<(u64, u64, u64)> = Vec::new();
            for &a in &needed {
                let Page { hash: h, idx } = pages[i].get(a).expect("a needed page is stored");
                if state.get(&a) == Some(&h) {
                    continue;
                }
                state.insert(a, h);
                let off = *at_offset.entry(h).or_insert_with(|| {
                    memfd_pages.push(idx);
                    (memfd_pages.len() as u64 - 1) * PAGE
                });
                match writes.last_mut() {
                    Some((wa, wn, wo)) if *wa + *wn * PAGE == a && *wo + *wn * PAGE == off => {
                        *wn += 1
                    }
                    _ => writes.push((a, 1, off)),
                }
            }
            let mut own: Vec<u64> = Vec::new();
            let mut zero: Vec<u64> = Vec::new();
            for (&a, h) in &state {
                match mine(a) {
                    Some(x) if x == *h => own.push(a),
                    Some(_) => {} // the fill writes this process's page over it
                    None => zero.push(a),
                }
            }
            own.sort_unstable();
            zero.sort_unstable();
            procs[i].push(Area {
                start: s,
                end: e,
                backing,
                adopt,
                writes,
                own,
                zero,
            });
            held[i].push(state);
        }
    }
    if procs.iter().all(Vec::is_empty) && !template {
        return Ok(None);
    }
    let memfd = if memfd_pages.is_empty() {
        None
    } else {
        Some(fill_memfd(snap, &memfd_pages)?)
    };
    let avoid = every_vma(m);
    Ok(Some(CowPlan {
        procs,
        avoid,
        memfd,
    }))
}

/// Every VMA of every process of `m`, sorted.
pub fn every_vma(m: &Manifest) -> Vec<(u64, u64)> {
    let mut avoid: Vec<(u64, u64)> = m
        .processes
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    avoid.sort_unstable();
    avoid
}

/// Process indexes, every parent before its children.
fn preorder(children: &[Vec<usize>]) -> Vec<usize> {
    let mut out = Vec::with_capacity(children.len());
    let mut stack = vec![0];
    while let Some(i) = stack.pop() {
        out.push(i);
        stack.extend(children[i].iter().rev());
    }
    out
}

/// A memfd holding the pages `indexes` (page-table records) one after the other,
/// decompressed and verified on all cores (it is on the way to the tree's first fork).
fn fill_memfd(snap: &Snapshot, indexes: &[u64]) -> Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(
        c"warmstart-shared-pages",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("memfd_create for the pages a tree shares")?;
    let file = std::fs::File::from(fd);
    file.set_len(indexes.len() as u64 * PAGE)
        .context("sizing the memfd of shared pages")?;
    /// Pages decoded per round (16 MiB), split over the cores.
    const ROUND: usize = 4096;
    /// Fewer pages are decoded on this thread: starting threads and waiting for them (a
    /// scheduling round each on a busy machine) costs more than decoding them (~4 µs a
    /// page).
    const SMALL: usize = 512;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut buf = vec![0u8; ROUND.min(indexes.len()) * PAGE_SIZE];
    for (r, round) in indexes.chunks(ROUND).enumerate() {
        let bytes = &mut buf[..round.len() * PAGE_SIZE];
        let threads = if round.len() < SMALL { 1 } else { threads };
        snap.read_page_list_parallel(round, bytes, threads)?;
        file.write_all_at(bytes, (r * ROUND) as u64 * PAGE)
            .context("writing the shared pages to their memfd")?;
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preorder_visits_parents_first() {
        let children = vec![vec![1, 3], vec![2], vec![], vec![]];
        assert_eq!(preorder(&children), vec![0, 1, 2, 3]);
    }

    #[test]
    fn vma_at_finds_the_containing_range() {
        let c = [(0x1000, 0x3000), (0x5000, 0x6000)];
        assert_eq!(vma_at(&c, 0x1000), Some((0x1000, 0x3000)));
        assert_eq!(vma_at(&c, 0x2fff), Some((0x1000, 0x3000)));
        assert_eq!(vma_at(&c, 0x3000), None);
        assert_eq!(vma_at(&c, 0x5000), Some((0x5000, 0x6000)));
        assert_eq!(vma_at(&c, 0x7000), None);
    }
}
