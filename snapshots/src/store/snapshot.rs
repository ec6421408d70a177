//! Reading a committed snapshot: its manifest, its mapped page table, its packs.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use memmap2::Mmap;

use super::table::{Record, TableMap, CODEC_LZ4, CODEC_RAW, TABLE_MAGIC};
use super::{SnapshotId, Store, StoreError, PACK_HEADER, PACK_MAGIC};
use crate::model::{Manifest, PAGE_SIZE};

/// An opened snapshot. Packs are mapped lazily on first use and kept mapped.
#[derive(Debug)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub manifest: Manifest,
    store: Store,
    table: TableMap,
    table_path: PathBuf,
    packs: RwLock<HashMap<u32, Arc<Mmap>>>,
}

impl Snapshot {
    pub(crate) fn open(
        store: &Store,
        id: SnapshotId,
        manifest: Manifest,
    ) -> Result<Self, StoreError> {
        let table_path = store.table_path(&id);
        let bad = |reason: String| StoreError::BadTable {
            id: id.short(),
            path: table_path.clone(),
            reason,
        };
        let table = TableMap::open(&table_path, TABLE_MAGIC)
            .map_err(|r| bad(r.unwrap_or_else(|| "the file is missing".into())))?;
        if table.len() != manifest.page_count {
            return Err(bad(format!(
                "it has {} records but the manifest says {}",
                table.len(),
                manifest.page_count
            )));
        }
        if table.pages_hash() != manifest.pages_hash {
            return Err(bad(
                "it belongs to different page contents than the manifest".into(),
            ));
        }
        Ok(Snapshot {
            id,
            manifest,
            store: store.clone(),
            table,
            table_path,
            packs: RwLock::new(HashMap::new()),
        })
    }

    /// Number of page-table records (`manifest.page_count`).
    pub fn page_count(&self) -> u64 {
        self.table.len()
    }

    /// Path of the page table file.
    pub fn table_path(&self) -> &std::path::Path {
        &self.table_path
    }

    /// The blake3 of page-table record `index`. Panics if out of range.
    pub fn page_hash(&self, index: u64) -> [u8; 32] {
        self.table.hash(index)
    }

    /// The record (hash and location) of page-table entry `index`. Panics if out of range.
    pub fn record(&self, index: u64) -> Record {
        self.table.record(index)
    }

    pub(crate) fn table(&self) -> &TableMap {
        &self.table
    }

    fn pack(&self, number: u32) -> Result<Arc<Mmap>, StoreError> {
        if let Some(m) = self.packs.read().unwrap().get(&number) {
            return Ok(m.clone());
        }
        let path = self.store.pack_path(number);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::MissingPack {
                    id: self.id.short(),
                    pack: path,
                })
            }
            Err(e) => {
                return Err(StoreError::Io {
                    action: "open pack",
                    path,
                    source: e,
                })
            }
        };
        // SAFETY: packs are immutable once renamed into packs/; gc only unlinks them.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::Io {
            action: "map pack",
            path: path.clone(),
            source: e,
        })?;
        if map.len() < PACK_HEADER || map[..8] != PACK_MAGIC {
            return Err(StoreError::CorruptPage {
                id: self.id.short(),
                page: 0,
                pack: path,
                reason: "the pack header is damaged".into(),
            });
        }
        let map = Arc::new(map);
        self.packs.write().unwrap().insert(number, map.clone());
        Ok(map)
    }

    /// Reads table records `first..first+count` into `out` (`count * 4096` bytes),
    /// decompressing each block once and verifying every page's blake3.
    pub fn read_pages(&self, first: u64, count: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let end = first.saturating_add(count);
        if end > self.table.len() {
            return Err(StoreError::PageRange {
                id: self.id.short(),
                first,
                end,
                count: self.table.len(),
            });
        }
        let expected = count * PAGE_SIZE as u64;
        if out.len() as u64 != expected {
            return Err(StoreError::BufferSize {
                got: out.len(),
                pages: count,
                expected,
            });
        }
        let mut scratch: Vec<u8> = Vec::new();
        let mut cur_block: Option<(u32, u64)> = None;
        let mut cur_pack: Option<(u32, Arc<Mmap>)> = None;
        for (k, i) in (first..end).enumerate() {
            let rec = self.table.record(i);
            let loc = rec.loc;
            let map = match &cur_pack {
                Some((n, m)) if *n == loc.pack => m.clone(),
                _ => {
                    let m = self.pack(loc.pack)?;
                    cur_pack = Some((loc.pack, m.clone()));
                    m
                }
            };
            let corrupt = |reason: String| StoreError::CorruptPage {
                id: self.id.short(),
                page: i,
                pack: self.store.pack_path(loc.pack),
                reason,
            };
            let start = loc.offset;
            let stop = start + u64::from(loc.len);
            if stop > map.len() as u64 {
                return Err(StoreError::ShortPack {
                    id: self.id.short(),
                    pack: self.store.pack_path(loc.pack),
                    page: i,
                    len: map.len() as u64,
                });
            }
            if loc.slot >= loc.pages || start < PACK_HEADER as u64 {
                return Err(corrupt("its page-table record is inconsistent".into()));
            }
            let src = &map[start as usize..stop as usize];
            let dst = &mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            let block_len = loc.pages as usize * PAGE_SIZE;
            let slot = loc.slot as usize * PAGE_SIZE;
            match loc.codec {
                CODEC_RAW => {
                    if src.len() != block_len {
                        return Err(corrupt("raw block has the wrong length".into()));
                    }
                    dst.copy_from_slice(&src[slot..slot + PAGE_SIZE]);
                }
                CODEC_LZ4 => {
                    if cur_block != Some((loc.pack, start)) {
                        scratch.resize(block_len, 0);
                        match lz4_flex::block::decompress_into(src, &mut scratch[..block_len]) {
                            Ok(n) if n == block_len => {}
                            Ok(n) => {
                                return Err(corrupt(format!(
                                    "block decompresses to {n} bytes, expected {block_len}"
                                )))
                            }
                            Err(e) => {
                                return Err(corrupt(format!("block does not decompress: {e}")))
                            }
                        }
                        cur_block = Some((loc.pack, start));
                    }
                    dst.copy_from_slice(&scratch[slot..slot + PAGE_SIZE]);
                }
                c => return Err(corrupt(format!("unknown block codec {c}"))),
            }
            if blake3::hash(dst).as_bytes() != &rec.hash {
                return Err(corrupt("its content does not match its hash".into()));
            }
        }
        Ok(())
    }
}
