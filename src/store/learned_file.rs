//! Learned room sizes on disk, for the embedded store (`store.learned_file`).
//!
//! One router with the memory store loses its pins when it stops, and that is fine: rooms
//! re-pin on their next join. Losing what it learned about room sizes is not: a weekly class
//! would be placed at the default size for a week after every restart. [`LearnedFile`] keeps
//! the learned sizes in memory, writes them to a file when they changed (every
//! [`FLUSH_EVERY`] and when the store is dropped, as on a graceful shutdown) and reads them
//! back when the router starts.
//!
//! The file is text, one room per line: `peak,peak,peak,last_seen_ms<TAB>room` (a room
//! key holds no control characters). It is replaced whole (written beside it, then renamed),
//! so a crash leaves the old file or the new one, never half of one. Lines that do not parse
//! are skipped and counted; a file larger than [`MAX_FILE_BYTES`] is refused (and none is
//! written larger). One write at a time: the periodic flush and the one at shutdown share
//! the sibling file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context;

use crate::cluster::reservations::Learned;
use crate::placement::Millis;
use crate::room::{Normalization, RoomKey, RoomMap};

/// How often changed sizes are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Largest file read at start (about 4 million rooms of usual names), and written: rooms
/// past it are left out of the file (a warning says how many), so that the router can
/// always read back what it wrote.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Learned sizes kept in memory and in a file.
#[derive(Debug)]
pub struct LearnedFile {
    path: PathBuf,
    rooms: RoomMap<Learned>,
    dirty: AtomicBool,
    /// Held by a write, start to rename: the periodic flush and the one at shutdown share
    /// the sibling file, and two writers in it at once would splice their lines.
    writing: Mutex<()>,
}

/// The file a write goes to before it is renamed over `path`.
fn sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Creates (or truncates) `tmp`, the file that will replace `path`, with `path`'s
/// permissions if it exists, else readable by the owner only: room names are the
/// organization's meetings, and an operator's `chmod` of the file must outlive the rename
/// every write ends with (a file made under the umask, 0644 as a rule, lost it).
fn create_private(tmp: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o777);
        open.mode(mode);
        let file = open.open(tmp)?;
        // `mode` applies only to a file the open creates: a sibling left by a crash keeps
        // its own unless set here.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        open.open(tmp)
    }
}

/// Whether `path`'s directory takes the sibling a write replaces it through: a file of
/// its own is made there and removed, never the writer's sibling itself, which a running
/// router may be writing (`check-config` before a restart) and whose rename over `path` an
/// emptied sibling would turn into a file of no sizes.
fn probe_sibling(path: &Path) -> anyhow::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".probe-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let probe = path.with_file_name(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "store.learned_file {}: cannot write beside it ({})",
                path.display(),
                probe.display()
            )
        })
}

impl LearnedFile {
    /// What [`LearnedFile::open`] refuses before it reads the file, checked without reading
    /// or writing it (`check-config`): a path that is no regular file, a file too large,
    /// or a directory that does not take the sibling every write goes through (missing,
    /// read-only: under systemd's `ProtectSystem=strict`, anything outside the unit's
    /// `StateDirectory`).
    pub fn check(path: &Path) -> anyhow::Result<()> {
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                anyhow::bail!("store.learned_file {}: not a regular file", path.display())
            }
            Ok(m) if m.len() > MAX_FILE_BYTES => anyhow::bail!(
                "store.learned_file {}: {} bytes, more than the {MAX_FILE_BYTES} read at start",
                path.display(),
                m.len()
            ),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("store.learned_file {}", path.display()))
            }
        }
        probe_sibling(path)
    }

    /// Reads `path` (a missing file is an empty one) and, inside a runtime, starts writing
    /// changes every [`FLUSH_EVERY`] until the returned value is dropped. Room names are
    /// taken as written; see [`LearnedFile::open_as`].
    pub fn open(path: &Path) -> anyhow::Result<Arc<LearnedFile>> {
        Self::open_as(path, Normalization::None)
    }

    /// [`LearnedFile::open`], with each room name read under `rooms` (the router's
    /// `rooms.normalization`): a file written under another normalization (`none`, then
    /// `lowercase`) would otherwise keep sizes under names no room has any longer, for
    /// `placement.history_ttl`. Names that become one keep the most recent session's.
    pub fn open_as(path: &Path, rooms_as: Normalization) -> anyhow::Result<Arc<LearnedFile>> {
        // Refused now rather than a warning every FLUSH_EVERY and sizes lost at every
        // restart (the file is replaced through a sibling, so its directory must take
        // one); and a FIFO or a device would hang the start or read without end.
        Self::check(path)?;
        let rooms: RoomMap<Learned> = RoomMap::default();
        match std::fs::metadata(path) {
            Ok(_) => {
                let bytes = read_at_most(path, MAX_FILE_BYTES)
                    .with_context(|| format!("store.learned_file {}", path.display()))?;
                let Some(bytes) = bytes else {
                    anyhow::bail!(
                        "store.learned_file {}: more than the {MAX_FILE_BYTES} bytes read at start",
                        path.display()
                    );
                };
                let mut skipped = 0usize;
                // Line by line: one line that is not UTF-8 is one line skipped.
                for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let parsed = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| parse_line(l, rooms_as));
                    match parsed {
                        Some((room, learned)) => {
                            let newer = rooms
                                .get(&room)
                                .is_none_or(|had| had.last_seen <= learned.last_seen);
                            if newer {
                                rooms.insert(room, learned);
                            }
                        }
                        None => skipped += 1,
                    }
                }
                if skipped > 0 {
                    tracing::warn!(file = %path.display(), skipped, "unreadable learned-size lines skipped");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("store.learned_file {}", path.display()))
            }
        }
        let file = Arc::new(LearnedFile {
            path: path.to_path_buf(),
            rooms,
            dirty: AtomicBool::new(false),
            writing: Mutex::new(()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(flush_periodically(Arc::downgrade(&file)));
        }
        Ok(file)
    }

    pub fn save(&self, room: &RoomKey, learned: Learned) {
        self.rooms.insert(room.clone(), learned);
        self.dirty.store(true, Ordering::Release);
    }

    /// Forgets rooms not seen since `before`, and brings times later than `now` back to
    /// `now` (see [`crate::store::PinStore::forget_learned`]).
    pub fn forget(&self, before: Millis, now: Millis) {
        let mut changed = false;
        self.rooms.retain(|_, l| {
            if l.last_seen > now {
                l.last_seen = now;
                changed = true;
            }
            changed |= l.last_seen < before;
            l.last_seen >= before
        });
        if changed {
            self.dirty.store(true, Ordering::Release);
        }
    }

    pub fn all(&self) -> Vec<(RoomKey, Learned)> {
        self.rooms
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    /// Writes the file if anything changed since the last write.
    pub fn flush(&self) -> std::io::Result<()> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let written = self.write();
        if written.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        written
    }

    /// The file a write goes to before it is renamed over [`LearnedFile::path`].
    fn sibling(&self) -> PathBuf {
        sibling(&self.path)
    }

    fn write(&self) -> std::io::Result<()> {
        // The lines first, then the disk: iterating the map holds each shard's lock, and a
        // write that stalls (a slow or wedged disk) under one would stall every session
        // that ends, and the sweep, behind it.
        let (mut text, mut left_out) = (Vec::new(), 0usize);
        for e in self.rooms.iter() {
            let line = format!("{}\t{}\n", e.value().encode(), e.key().as_str());
            if (text.len() + line.len()) as u64 > MAX_FILE_BYTES {
                left_out += 1;
                continue;
            }
            text.extend_from_slice(line.as_bytes());
        }
        if left_out > 0 {
            tracing::warn!(file = %self.path.display(), left_out, "learned room sizes past the file's limit not written");
        }
        let tmp = self.sibling();
        let mut out = create_private(&tmp, &self.path)?;
        out.write_all(&text)?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, &self.path)?;
        // The rename is the directory's change: synced too, or a crash may undo it.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// [`LearnedFile::flush`], a failure logged: for when nobody is left to retry.
    pub fn flush_or_warn(&self) {
        if let Err(e) = self.flush() {
            tracing::warn!(file = %self.path.display(), error = %e, "learned room sizes not written");
        }
    }
}

impl Drop for LearnedFile {
    fn drop(&mut self) {
        self.flush_or_warn();
    }
}

/// The file's bytes, or `None` if it holds more than `max` (the limit holds for what is
/// read, whatever the size looked like a moment before).
fn read_at_most(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

fn parse_line(line: &str, rooms_as: Normalization) -> Option<(RoomKey, Learned)> {
    let (learned, room) = line.split_once('\t')?;
    Some((
        RoomKey::parse(room, rooms_as).ok()?,
        Learned::decode(learned)?,
    ))
}

async fn flush_periodically(file: Weak<LearnedFile>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(file) = file.upgrade() else { return };
        // The write is small and rare; done off the async workers all the same.
        let result = tokio::task::spawn_blocking({
            let file = file.clone();
            move || file.flush()
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(file = %file.path.display(), error = %e, "learned room sizes not written; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomKey {
        RoomKey::parse(s, Normalization::None).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "roomrouter-learned-{}-{name}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("learned.txt")
    }

    #[test]
    fn names_are_read_under_the_routers_normalization_and_the_newest_wins() {
        let path = temp_path("normalized");
        // Written while rooms were taken as they came; read by a lowercasing router.
        std::fs::write(
            &path,
            "30,0,0,1000\tStandUp\n12,0,0,2000\tstandup\n7,0,0,5\tOther\n",
        )
        .unwrap();
        let f = LearnedFile::open_as(&path, Normalization::Lowercase).unwrap();
        let mut all = f.all();
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let names: Vec<_> = all
            .iter()
            .map(|(r, l)| (r.as_str().to_string(), l.peaks[0]))
            .collect();
        assert_eq!(
            names,
            [("other".to_string(), 7), ("standup".to_string(), 12)]
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_the_owners_alone_and_keeps_the_mode_an_operator_gave_it() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = temp_path("mode");
        let f = LearnedFile::open(&path).unwrap();
        let l = Learned {
            peaks: [4, 0, 0],
            last_seen: 1,
        };
        f.save(&room("a"), l);
        f.flush().unwrap();
        assert_eq!(mode(&path), 0o600, "room names are not the world's to read");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        // A sibling a crash left, readable by all, does not lend the file its mode.
        std::fs::write(path.with_file_name("learned.txt.tmp"), "x").unwrap();
        std::fs::set_permissions(
            path.with_file_name("learned.txt.tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        f.save(&room("b"), l);
        f.flush().unwrap();
        assert_eq!(mode(&path), 0o640, "the operator's chmod outlives a write");
        assert_eq!(LearnedFile::open(&path).unwrap().all().len(), 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn sizes_written_are_read_back_and_forgotten_ones_are_not() {
        let path = temp_path("roundtrip");
        let f = LearnedFile::open(&path).unwrap();
        assert!(f.all().is_empty(), "a missing file is an empty one");
        let l = |p, t| Learned {
            peaks: [p, 0, 0],
            last_seen: t,
        };
        f.save(&room("class 7b"), l(40, 1_000));
        f.save(&room("standup"), l(6, 10));
        f.flush().unwrap();
        assert!(!path.with_file_name("learned.txt.tmp").exists());
        let g = LearnedFile::open(&path).unwrap();
        let mut all = g.all();
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        assert_eq!(
            all,
            vec![
                (room("class 7b"), l(40, 1_000)),
                (room("standup"), l(6, 10))
            ]
        );
        g.forget(500, u64::MAX);
        drop(g); // writes on drop
        assert_eq!(
            LearnedFile::open(&path).unwrap().all(),
            vec![(room("class 7b"), l(40, 1_000))]
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn unreadable_lines_are_skipped_and_a_huge_file_is_refused() {
        let path = temp_path("garbage");
        std::fs::write(
            &path,
            "12,0,0,5\tgood\nnonsense\n1,2,3\tshort\n\n7,7,7,7\tbad/room\n3,2,1,9\tother\n",
        )
        .unwrap();
        let f = LearnedFile::open(&path).unwrap();
        let mut rooms: Vec<String> = f.all().iter().map(|(r, _)| r.as_str().into()).collect();
        rooms.sort();
        assert_eq!(rooms, ["good", "other"]);
        drop(f);
        let big = std::fs::File::create(&path).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = LearnedFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("store.learned_file"), "{e}");
        // What is read is bounded too, whatever the size looked like before.
        std::fs::write(&path, "x".repeat(100)).unwrap();
        assert_eq!(read_at_most(&path, 99).unwrap(), None);
        assert_eq!(
            read_at_most(&path, 100).unwrap().map(|b| b.len()),
            Some(100)
        );
        // A FIFO (or a device) is no file to read: refused, not waited on.
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        if made.is_ok_and(|s| s.success()) {
            let e = LearnedFile::open(&path).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// The write holds no lock of the table while it is on the disk: a flush stuck in a
    /// write (a wedged disk; here a pipe nobody reads) does not hold up the sweep's
    /// `forget`, nor a session's `save`, which before waited on the shard being written.
    #[test]
    fn a_flush_stuck_on_the_disk_does_not_hold_up_the_table() {
        let path = temp_path("stuck");
        let f = LearnedFile::open(&path).unwrap();
        let l = Learned {
            peaks: [5, 0, 0],
            last_seen: 1,
        };
        // Well over a pipe's 64 KiB in every shard.
        for i in 0..50_000 {
            f.save(&room(&format!("room-with-a-longish-name-{i}")), l);
        }
        let tmp = path.with_file_name("learned.txt.tmp");
        let made = std::process::Command::new("mkfifo").arg(&tmp).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: no mkfifo");
            return;
        }
        // The reader opens the pipe (so the writer's open returns) and reads nothing until
        // told to drain it.
        let (drain_tx, drain_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn({
            let tmp = tmp.clone();
            move || {
                use std::io::Read;
                let mut pipe = std::fs::File::open(&tmp).unwrap();
                let _ = drain_rx.recv_timeout(Duration::from_secs(30));
                let mut sink = Vec::new();
                let _ = pipe.read_to_end(&mut sink);
            }
        });
        let writer = std::thread::spawn({
            let f = f.clone();
            move || f.flush()
        });
        std::thread::sleep(Duration::from_millis(300));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let forgetter = std::thread::spawn({
            let f = f.clone();
            move || {
                f.forget(0, u64::MAX);
                f.save(&room("a-session-that-ended"), l);
                let _ = done_tx.send(());
            }
        });
        let unblocked = done_rx.recv_timeout(Duration::from_secs(3)).is_ok();
        let _ = drain_tx.send(());
        // Failed: said at once, the stuck threads left behind (joined, they may not end).
        assert!(
            unblocked,
            "forget and save waited on a write stuck on the disk"
        );
        reader.join().unwrap();
        // A pipe takes no fsync: the write itself fails in the end, which is not the point.
        let _ = writer.join().unwrap();
        forgetter.join().unwrap();
        std::fs::remove_file(&tmp).unwrap();
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_file_in_a_directory_that_does_not_exist_is_refused_at_open() {
        let path = temp_path("nowhere");
        let dir = path.parent().unwrap().to_path_buf();
        let inside = dir.join("missing").join("learned.txt");
        let e = format!("{:#}", LearnedFile::open(&inside).unwrap_err());
        assert!(
            e.contains("store.learned_file") && e.contains("cannot write"),
            "{e}"
        );
        // The probe leaves nothing behind where it can write.
        LearnedFile::open(&path).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_check_leaves_a_running_routers_write_alone() {
        let path = temp_path("running");
        // A running router is halfway through its flush: its sibling holds the lines.
        let theirs = path.with_file_name("learned.txt.tmp");
        std::fs::write(&theirs, "3,0,0,1\tstandup\n").unwrap();
        LearnedFile::check(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "3,0,0,1\tstandup\n"
        );
        // And the check's own probe is gone.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_line_that_is_not_utf8_is_skipped_not_the_file() {
        let path = temp_path("bytes");
        std::fs::write(&path, b"\xff\tx\n12,0,0,5\tgood\n3,2,1,9\tb\xc3\n").unwrap();
        let f = LearnedFile::open(&path).unwrap();
        let rooms: Vec<String> = f.all().iter().map(|(r, _)| r.as_str().into()).collect();
        assert_eq!(rooms, ["good"]);
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn writers_at_once_neither_fail_nor_lose_a_room() {
        // The periodic flush and the one at shutdown may meet: both write the sibling file
        // and rename it. One at a time, every write succeeds and the last one has every
        // room saved before it.
        let path = temp_path("racing");
        let f = LearnedFile::open(&path).unwrap();
        let (writers, rooms_each) = (4, 50);
        std::thread::scope(|s| {
            for w in 0..writers {
                let f = &f;
                s.spawn(move || {
                    for n in 0..rooms_each {
                        let learned = Learned {
                            peaks: [n + 1, 0, 0],
                            last_seen: 1,
                        };
                        f.save(&room(&format!("w{w}-r{n}")), learned);
                        f.flush().expect("a write failed beside another");
                    }
                });
            }
        });
        drop(f);
        let back = LearnedFile::open(&path).unwrap().all();
        assert_eq!(back.len(), (writers * rooms_each) as usize);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_size_stamped_while_the_clock_was_ahead_is_brought_back_to_now() {
        let path = temp_path("ahead");
        let l = |peak, last_seen| Learned {
            peaks: [peak, 0, 0],
            last_seen,
        };
        let f = LearnedFile::open(&path).unwrap();
        f.save(&room("ahead"), l(25, 1_000_000));
        f.save(&room("due"), l(8, 900));
        f.flush().unwrap();
        // The clock stepped back to 2 000; history_ttl is 1 000.
        f.forget(1_000, 2_000);
        assert_eq!(f.all(), vec![(room("ahead"), l(25, 2_000))]);
        drop(f);
        let f = LearnedFile::open(&path).unwrap();
        assert_eq!(f.all(), vec![(room("ahead"), l(25, 2_000))], "written so");
        // Forgotten history_ttl after now, not after the step.
        f.forget(2_001, 3_001);
        assert!(f.all().is_empty());
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn nothing_is_written_when_nothing_changed() {
        let path = temp_path("quiet");
        let f = LearnedFile::open(&path).unwrap();
        f.flush().unwrap();
        assert!(!path.exists());
        f.forget(u64::MAX, u64::MAX);
        drop(f);
        assert!(!path.exists());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
