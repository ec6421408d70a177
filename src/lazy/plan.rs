//! What a lazy restore serves: the registered ranges and the address ⇄ page-table map.

use warmstart_snapshots::model::{Process, RunContent, Vma, VmaKind, PAGE_SIZE};

pub(crate) const PAGE: u64 = PAGE_SIZE as u64;

/// A contiguous stretch of stored pages: `pages` pages at `addr` whose contents are
/// page-table records `first..first + pages` (page `i` at `addr + i * 4096` is record
/// `first + i`). Extents never span two VMAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub addr: u64,
    pub pages: u64,
    pub first: u64,
    /// The VMA is `MADV_DONTFORK` or `MADV_WIPEONFORK`: a forked child does not get
    /// these pages (absent, or zero-filled), so its bookkeeping drops them.
    pub drop_on_fork: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.addr + self.pages * PAGE
    }
}

/// The plan of a lazy restore of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyPlan {
    /// `(start, len)` of every VMA to register with `UFFDIO_REGISTER_MODE_MISSING`,
    /// sorted by address: the private anonymous VMAs holding at least one stored page.
    pub ranges: Vec<(u64, u64)>,
    /// Stored pages of those VMAs, sorted by address, non-overlapping.
    pub extents: Vec<Extent>,
    /// Number of page-table records of the snapshot (sizes the page bitmaps).
    pub page_count: u64,
}

/// Whether `v` is served lazily: private anonymous memory only. Shared anonymous memory
/// and file mappings (even private ones) keep the eager path.
pub fn is_lazy_vma(v: &Vma) -> bool {
    !v.shared && matches!(v.kind, VmaKind::Anon { .. })
}

/// Builds the plan of `p`: every private anonymous VMA with `Data` runs is registered
/// whole (registering part of a VMA would split it); `Zero` runs and never-populated
/// pages need nothing: a fault there is answered with `UFFDIO_ZEROPAGE`.
///
/// `page_count` is left 0; [`LazyServer::new`](super::LazyServer::new) takes it from the
/// snapshot.
pub fn plan(p: &Process) -> LazyPlan {
    let mut out = LazyPlan::default();
    for v in p.vmas.iter().filter(|v| is_lazy_vma(v)) {
        let drop_on_fork = v.flags.dontfork || v.flags.wipeonfork;
        let before = out.extents.len();
        for r in &v.pages {
            let RunContent::Data { first } = r.content else {
                continue;
            };
            // Clip to the VMA: a malformed run never makes us copy outside it.
            let count = r.count.min(v.page_count().saturating_sub(r.page));
            if count == 0 {
                continue;
            }
            out.extents.push(Extent {
                addr: v.start + r.page * PAGE,
                pages: count,
                first,
                drop_on_fork,
            });
        }
        if out.extents.len() > before {
            out.ranges.push((v.start, v.len()));
        }
    }
    out.ranges.sort_unstable();
    out.extents.sort_unstable_by_key(|e| e.addr);
    out
}

impl LazyPlan {
    /// Drops the VMAs `eager` (sorted `(start, len)`) from the plan: restored eagerly.
    pub fn leave_out(&mut self, eager: &[(u64, u64)]) {
        if eager.is_empty() {
            return;
        }
        self.ranges.retain(|r| eager.binary_search(r).is_err());
        let inside = |addr: u64| {
            let i = eager.partition_point(|&(s, l)| s + l <= addr);
            eager.get(i).is_some_and(|&(s, _)| s <= addr)
        };
        self.extents.retain(|e| !inside(e.addr));
    }

    /// Total stored pages the plan serves.
    pub fn data_pages(&self) -> u64 {
        self.extents.iter().map(|e| e.pages).sum()
    }

    /// The page-table index of the page holding `addr`, if it is a stored page.
    pub fn index_of(&self, addr: u64) -> Option<u64> {
        find(&self.extents, addr).map(|(i, off)| self.extents[i].first + off)
    }

    /// Checks the plan is usable against a snapshot of `page_count` records.
    pub(crate) fn validate(&self, page_count: u64) -> Result<(), String> {
        let mut by_first: Vec<(u64, u64)> =
            self.extents.iter().map(|e| (e.first, e.pages)).collect();
        by_first.sort_unstable();
        for w in by_first.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!(
                    "page-table records {}..+{} are used at two addresses",
                    w[1].0, w[0].1
                ));
            }
        }
        if let Some(&(f, n)) = by_first.last() {
            if f.checked_add(n).is_none_or(|e| e > page_count) {
                return Err(format!(
                    "records {f}..+{n} lie beyond the snapshot's {page_count} pages"
                ));
            }
        }
        for w in self.extents.windows(2) {
            if w[0].end() > w[1].addr {
                return Err(format!("stored pages overlap at {:#x}", w[1].addr));
            }
        }
        for e in &self.extents {
            if e.addr % PAGE != 0 {
                return Err(format!("unaligned extent at {:#x}", e.addr));
            }
        }
        Ok(())
    }
}

/// The extent holding `addr` and the page offset in it (binary search).
pub(crate) fn find(extents: &[Extent], addr: u64) -> Option<(usize, u64)> {
    let i = extents.partition_point(|e| e.end() <= addr);
    let e = extents.get(i)?;
    (e.addr <= addr).then(|| (i, (addr - e.addr) / PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(addr: u64, pages: u64, first: u64) -> Extent {
        Extent {
            addr,
            pages,
            first,
            drop_on_fork: false,
        }
    }

    #[test]
    fn find_and_index() {
        let p = LazyPlan {
            ranges: vec![],
            extents: vec![ext(0x1000, 2, 10), ext(0x5000, 3, 0)],
            page_count: 12,
        };
        assert_eq!(p.index_of(0xfff), None);
        assert_eq!(p.index_of(0x1000), Some(10));
        assert_eq!(p.index_of(0x2fff), Some(11));
        assert_eq!(p.index_of(0x3000), None);
        assert_eq!(p.index_of(0x7000), Some(2));
        assert_eq!(p.index_of(0x8000), None);
        assert!(p.validate(12).is_ok());
        assert!(p.validate(11).is_err());
        let bad = LazyPlan {
            extents: vec![ext(0x1000, 2, 0), ext(0x5000, 3, 1)],
            ..p
        };
        assert!(bad.validate(12).is_err());
    }
}
