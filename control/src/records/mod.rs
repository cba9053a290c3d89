//! The call-record store: `<data-dir>/records.redb`, an embedded database (redb: one file, no
//! server), or with `--records-url` a PostgreSQL database every node of a cluster shares
//! ([`postgres`]). Owner cores hand every record change to a bounded queue; one writer thread
//! batches the changes and commits at most once a [`COMMIT_INTERVAL`], so a crash loses at most the
//! last second; [`RecordStore::close`] commits everything left. While PostgreSQL is down the
//! writer keeps the changes (at most [`PENDING_CAPACITY`] calls) and writes them once it is back.
//! Analytics read either backend through [`Records`].
//!
//! Invariant: nothing here runs on a core's thread except [`RecordStore::sink`]'s closure, which
//! only `try_send`s (a full queue is a counted drop); every database access happens on the writer
//! thread or on a blocking-pool thread.

pub mod postgres;
pub mod query;
pub mod time;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};
use relay_engine::config::RecordSink;
use relay_engine::core::command::{CallRecord, Direction, RecordChange};
use serde::{Deserialize, Serialize};

/// The database file's name inside `--data-dir`.
pub const FILE_NAME: &str = "records.redb";
/// Longest time a change waits in memory before it is committed: the most a crash can lose.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Changes queued between the cores and the writer thread. The writer drains the queue into
/// memory continuously (it only waits for the disk once a second), so this absorbs the burst of
/// every call ending at once at shutdown on a large relay; past it, changes are dropped and
/// counted ([`StoreStats::dropped`]).
pub const QUEUE_CAPACITY: usize = 65_536;
/// Calls whose latest change the writer holds for its next commit. Past it (a database down
/// for long on a busy node), changes of further calls are dropped and counted
/// ([`StoreStats::dropped`]); changes of calls already held replace their older one.
pub const PENDING_CAPACITY: usize = 65_536;

/// Every call by id: the whole record, as JSON.
const CALLS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("calls");
/// Calls by (project, creation ms, id): a [`Summary`] as JSON, so that aggregates over a date
/// range read only this index.
const BY_PROJECT: TableDefinition<'_, (&str, u64, &str), &[u8]> = TableDefinition::new("calls_by_project");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// redb's error, boxed (it is large, and rare).
    #[error("{0}")]
    Redb(Box<redb::Error>),
    /// The shared database cannot be reached now (down, restarting, network): try again later.
    #[error("the records database is unavailable: {0}")]
    Unavailable(String),
    /// The shared database answered with an error.
    #[error("records database: {0}")]
    Database(String),
}

impl Error {
    /// Whether the database is unreachable (as opposed to failing a request it received).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self::Redb(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    std::io::Error
);

/// How calls are assigned to projects, and the projects' display names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projects {
    /// Project of calls to (inbound) or from (outbound) each of the relay's numbers.
    pub by_number: HashMap<String, String>,
    /// Project of calls nothing else assigns.
    pub default: String,
    /// Display names (`projectName`) by project id; a project without one is named by its id.
    pub names: HashMap<String, String>,
}

impl Projects {
    /// The project of `record`: its own `projectId`, else the project of its called number, else
    /// of its calling number (an outbound call's `from` is the relay's own number), else the
    /// default.
    pub fn resolve(&self, record: &CallRecord) -> String {
        record
            .project_id
            .clone()
            .or_else(|| record.to.as_ref().and_then(|n| self.by_number.get(n)).cloned())
            .or_else(|| record.from.as_ref().and_then(|n| self.by_number.get(n)).cloned())
            .unwrap_or_else(|| self.default.clone())
    }

    /// The display name of project `id`.
    pub fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.names.get(id).map_or(id, String::as_str)
    }
}

/// A call record as stored: the engine's record plus its id and resolved project.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCall {
    /// The call (session) id, Twilio's call sid for phone calls.
    pub id: String,
    /// The project it belongs to.
    pub project_id: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Caller number.
    pub from: Option<String>,
    /// Called number.
    pub to: Option<String>,
    /// Latest Twilio call status.
    pub status: String,
    /// When the caller's stream started, ms since the epoch.
    pub start_ms: Option<u64>,
    /// When the call ended, ms since the epoch.
    pub end_ms: Option<u64>,
    /// Length of the call, seconds: Twilio's figure, else the stream's end minus its start;
    /// `None` while the call has not ended.
    pub duration_secs: Option<u64>,
    /// What the call was about, when known.
    pub intent: Option<String>,
    /// The conversation, one `role: text` line per utterance.
    pub transcript: String,
    /// The user who initiated an outbound call.
    pub user_id: Option<String>,
    /// Outbound call instructions for the agent.
    pub prompt: Option<String>,
    /// Outbound call first sentence for the agent.
    pub first_message: Option<String>,
    /// When the relay first heard of the call, ms since the epoch.
    pub created_ms: u64,
    /// Function calls the call's agent made (absent in records written before they were counted).
    #[serde(default)]
    pub function_calls: u64,
    /// The node that served the call (`--node-id`; empty in records written before nodes were
    /// named).
    #[serde(default)]
    pub node: String,
}

impl StoredCall {
    /// The stored form of `change`, merged with what the store already holds for the call
    /// (`older`): a core that forgot a call (evicted past `records_per_core`, or a restart) starts
    /// a fresh record on its next event, which must not erase what was known.
    pub fn from_change(change: &RecordChange, projects: &Projects, older: Option<&Self>) -> Self {
        let r = &change.record;
        let duration_secs = r.duration_secs.or_else(|| match (r.start_ms, r.end_ms) {
            (Some(start), Some(end)) => Some(end.saturating_sub(start) / 1000),
            _ => None,
        });
        let mut call = Self {
            id: change.id.as_str().to_owned(),
            project_id: projects.resolve(r),
            direction: r.direction.name().to_owned(),
            from: r.from.clone(),
            to: r.to.clone(),
            status: r.status.clone(),
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            duration_secs,
            intent: r.intent.clone(),
            transcript: r.transcript.clone(),
            user_id: r.user_id.clone(),
            prompt: r.prompt.clone(),
            first_message: r.first_message.clone(),
            created_ms: r.created_ms,
            function_calls: r.function_calls,
            node: r.node.clone(),
        };
        // Another record of the same call: made again by a core that had forgotten it, or made by
        // another node of a cluster (whose clock may be behind or ahead).
        if let Some(old) = older.filter(|old| old.created_ms != call.created_ms) {
            // A re-created record: it knows only what happened since; the rest comes from before.
            call.created_ms = old.created_ms.min(call.created_ms);
            if r.project_id.is_none() {
                call.project_id.clone_from(&old.project_id);
            }
            if old.direction == "outbound" {
                call.direction.clone_from(&old.direction);
            }
            if status_rank(&old.status) > status_rank(&call.status) {
                call.status.clone_from(&old.status);
            }
            for (new, old) in [
                (&mut call.from, &old.from),
                (&mut call.to, &old.to),
                (&mut call.intent, &old.intent),
                (&mut call.user_id, &old.user_id),
                (&mut call.prompt, &old.prompt),
                (&mut call.first_message, &old.first_message),
            ] {
                if new.is_none() {
                    new.clone_from(old);
                }
            }
            // The re-created record counts from zero again; the larger count loses least.
            call.function_calls = call.function_calls.max(old.function_calls);
            if call.node.is_empty() {
                call.node.clone_from(&old.node);
            }
            call.start_ms = old.start_ms.or(call.start_ms);
            call.end_ms = call.end_ms.or(old.end_ms);
            call.duration_secs = call.duration_secs.or(old.duration_secs);
            if call.transcript.is_empty() {
                call.transcript.clone_from(&old.transcript);
            }
        }
        call
    }

    /// The call as the engine's record (what `/call-status` and `/end-call` read), for a call
    /// this node does not hold in memory.
    pub fn into_record(self) -> CallRecord {
        CallRecord {
            user_id: self.user_id,
            status: self.status,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            duration_secs: self.duration_secs,
            from: self.from,
            to: self.to,
            prompt: self.prompt,
            first_message: self.first_message,
            transcript: self.transcript,
            created_ms: self.created_ms,
            project_id: Some(self.project_id),
            intent: self.intent,
            direction: if self.direction == "outbound" { Direction::Outbound } else { Direction::Inbound },
            function_calls: self.function_calls,
            ..CallRecord::default()
        }
    }

    /// What aggregates need of the call.
    pub fn summary(&self) -> Summary {
        Summary {
            status: self.status.clone(),
            duration_secs: self.duration_secs,
            intent: self.intent.clone(),
            function_calls: self.function_calls,
        }
    }
}

/// The part of a call that aggregates read, kept in the project index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Latest Twilio call status.
    pub status: String,
    /// Length of the call, seconds, once ended.
    pub duration_secs: Option<u64>,
    /// What the call was about, when known.
    pub intent: Option<String>,
    /// Function calls the call's agent made (absent in summaries written before they were counted).
    #[serde(default)]
    pub function_calls: u64,
}

/// Counters of the store, readable from any thread.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Changes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Records written (upserts committed).
    pub written: AtomicU64,
    /// Changes queued for the writer thread and not yet taken by it.
    pub queued: AtomicU64,
    /// Calls whose latest change the writer holds and has not committed yet (they pile up while
    /// the database is down).
    pub pending: AtomicU64,
    /// Whether the last commit failed (the changes are kept and retried).
    pub failing: AtomicBool,
}

/// What the writer thread is told.
enum Message {
    /// A record changed.
    Change(Box<RecordChange>),
    /// Commit what is pending now, then answer.
    Flush(mpsc::Sender<Result<(), String>>),
    /// Commit what is pending, answer, and stop.
    Close(mpsc::Sender<Result<(), String>>),
}

/// The open store: its database, the writer thread and the queue into it.
pub struct RecordStore {
    records: Records,
    tx: SyncSender<Message>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<StoreStats>,
}

impl RecordStore {
    /// Opens (or creates) `<dir>/records.redb` and starts the writer thread.
    ///
    /// # Errors
    /// When the file cannot be opened or created (another relay holds it, a corrupt file, no
    /// permission), or the thread cannot start.
    pub fn open(dir: &Path, projects: Projects) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                anyhow::anyhow!("{} is in use by another relay: give each relay its own --data-dir", path.display())
            }
            other => anyhow::anyhow!("cannot open the records database {}: {other}", path.display()),
        })?;
        let txn = db.begin_write().context("records database")?;
        txn.open_table(CALLS).context("records database")?;
        txn.open_table(BY_PROJECT).context("records database")?;
        txn.commit().context("records database")?;
        let records = Records { backend: Backend::Redb(Arc::new(db)), projects: Arc::new(projects) };
        Self::start(records, Target::Redb)
    }

    /// Connects to the shared PostgreSQL database of `settings`, creates or migrates its schema,
    /// and starts the writer thread, which names `node` on the calls it creates.
    ///
    /// # Errors
    /// When the database cannot be reached at start (the message names it without its password),
    /// its schema is newer than this relay's, or the thread cannot start.
    pub fn connect(settings: &postgres::Settings, node: &str, projects: Projects) -> anyhow::Result<Self> {
        postgres::prepare(settings, node)
            .map_err(|e| anyhow::anyhow!("cannot prepare the records database {settings}: {e}"))?;
        let records = Records {
            backend: Backend::Postgres(Arc::new(postgres::Pool::new(settings.clone()))),
            projects: Arc::new(projects),
        };
        Self::start(records, Target::Postgres(Box::new(postgres::Writer::new(settings.clone(), node.to_owned()))))
    }

    fn start(records: Records, target: Target) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer = Writer { records: records.clone(), target, stats: stats.clone(), pending: HashMap::new() };
        let writer = std::thread::Builder::new()
            .name("records-writer".into())
            .spawn(move || writer.run(&rx))
            .context("cannot start the records writer thread")?;
        Ok(Self { records, tx, writer: Some(writer), stats })
    }

    /// The engine's end of the queue: each change is `try_send`, never waited for.
    pub fn sink(&self) -> RecordSink {
        let tx = self.tx.clone();
        let stats = self.stats.clone();
        RecordSink::new(move |change| {
            // Counted before the send, so that the writer never takes a change not yet counted.
            stats.queued.fetch_add(1, Ordering::Relaxed);
            match tx.try_send(Message::Change(change)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    if stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!("call records queue is full: record changes are being dropped");
                    }
                }
                // Closed: the relay is past shutdown; nothing more is written.
                Err(TrySendError::Disconnected(_)) => {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })
    }

    /// A read handle, for analytics and health checks.
    pub fn records(&self) -> Records {
        self.records.clone()
    }

    /// The store's counters.
    pub fn stats(&self) -> Arc<StoreStats> {
        self.stats.clone()
    }

    /// Commits every change queued so far, waiting for the writer.
    ///
    /// # Errors
    /// When the commit fails or the writer is gone.
    pub fn flush(&self) -> Result<(), String> {
        let (ack_tx, ack_rx) = mpsc::channel();
        // Blocking is fine here: this runs on a control thread (startup, shutdown, tests), never a core.
        self.tx.send(Message::Flush(ack_tx)).map_err(|_| "the records writer has stopped".to_owned())?;
        ack_rx.recv().map_err(|_| "the records writer has stopped".to_owned())?
    }

    /// Commits everything queued and stops the writer. Call after the cores have stopped, so
    /// that the records of the calls they ended are in the queue.
    ///
    /// # Errors
    /// When the last commit fails.
    pub fn close(mut self) -> Result<(), String> {
        self.shut()
    }

    fn shut(&mut self) -> Result<(), String> {
        let Some(writer) = self.writer.take() else { return Ok(()) };
        let (ack_tx, ack_rx) = mpsc::channel();
        let result = match self.tx.send(Message::Close(ack_tx)) {
            Ok(()) => ack_rx.recv().unwrap_or_else(|_| Err("the records writer has stopped".to_owned())),
            Err(_) => Err("the records writer has stopped".to_owned()),
        };
        let _ = writer.join();
        result
    }
}

impl Drop for RecordStore {
    fn drop(&mut self) {
        if let Err(e) = self.shut() {
            tracing::error!("call records not all saved: {e}");
        }
    }
}

/// Where the writer thread commits.
enum Target {
    /// The embedded database, through [`Records`].
    Redb,
    /// The shared database, over the writer's own connection.
    Postgres(Box<postgres::Writer>),
}

/// The writer thread's state: changes waiting for the next commit, latest per call.
struct Writer {
    records: Records,
    target: Target,
    stats: Arc<StoreStats>,
    pending: HashMap<String, Box<RecordChange>>,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Message>) {
        // When the oldest pending change arrived: it is committed within COMMIT_INTERVAL of it.
        let mut oldest: Option<Instant> = None;
        loop {
            let message = match oldest {
                Some(since) => match rx.recv_timeout(COMMIT_INTERVAL.saturating_sub(since.elapsed())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = self.commit();
                        return;
                    }
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            match message {
                Some(Message::Change(change)) => {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    oldest.get_or_insert_with(Instant::now);
                    self.hold(change);
                }
                Some(Message::Flush(ack)) => {
                    self.retry_now();
                    let _ = ack.send(self.commit());
                    oldest = (!self.pending.is_empty()).then(Instant::now);
                }
                Some(Message::Close(ack)) => {
                    // Changes sent before the close are all in the queue ahead of it.
                    while let Ok(Message::Change(change)) = rx.try_recv() {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        self.hold(change);
                    }
                    self.retry_now();
                    let _ = ack.send(self.commit());
                    return;
                }
                None => {}
            }
            if oldest.is_some_and(|since| since.elapsed() >= COMMIT_INTERVAL) {
                let _ = self.commit();
                // A failed commit keeps its changes and is retried a second later.
                oldest = (!self.pending.is_empty()).then(Instant::now);
            }
        }
    }

    /// A commit asked for now (flush, close) tries the database at once, backoff or not.
    fn retry_now(&mut self) {
        if let Target::Postgres(writer) = &mut self.target {
            writer.retry_now();
        }
    }

    /// Keeps `change` for the next commit (replacing its call's older change), or drops it
    /// (counted) when [`PENDING_CAPACITY`] calls are already held.
    fn hold(&mut self, change: Box<RecordChange>) {
        let id = change.id.as_str();
        if self.pending.len() >= PENDING_CAPACITY && !self.pending.contains_key(id) {
            if self.stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("{PENDING_CAPACITY} calls' records wait for the database: further changes are dropped");
            }
            return;
        }
        self.pending.insert(id.to_owned(), change);
        self.stats.pending.store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Writes every pending change in one transaction.
    fn commit(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let count = self.pending.len() as u64;
        let changes = self.pending.values().map(|c| &**c);
        let result = match &mut self.target {
            Target::Redb => self.records.upsert(changes),
            Target::Postgres(writer) => writer.upsert(changes, &self.records.projects),
        };
        match result {
            Ok(()) => {
                self.pending.clear();
                self.stats.pending.store(0, Ordering::Relaxed);
                self.stats.written.fetch_add(count, Ordering::Relaxed);
                self.stats.failing.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if !self.stats.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!("cannot save call records (kept, retrying every second): {e}");
                }
                Err(e.to_string())
            }
        }
    }
}

/// Read access to the store (and the writer's upserts to redb); cheap to clone, usable from any
/// thread but a core's (every read blocks).
#[derive(Clone)]
pub struct Records {
    backend: Backend,
    projects: Arc<Projects>,
}

/// Which database the records are in.
#[derive(Clone)]
enum Backend {
    /// The embedded one, this node's calls only.
    Redb(Arc<Database>),
    /// The shared one, every node's calls.
    Postgres(Arc<postgres::Pool>),
}

impl Records {
    /// How calls map to projects.
    pub fn projects(&self) -> &Projects {
        &self.projects
    }

    /// The shared database's connections, when the records are in PostgreSQL (per-user limits
    /// are counted there too).
    pub fn shared(&self) -> Option<Arc<postgres::Pool>> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(pool) => Some(pool.clone()),
        }
    }

    /// The backend's name in `/health/detailed`: `redb` or `postgresql`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Redb(_) => "redb",
            Backend::Postgres(_) => "postgresql",
        }
    }

    fn redb(&self) -> Result<&Database, Error> {
        match &self.backend {
            Backend::Redb(db) => Ok(db),
            Backend::Postgres(_) => Err(Error::Database("not an embedded database".to_owned())),
        }
    }

    /// Every call of `project` created in `from_ms..=to_ms`, oldest first: (creation ms, summary).
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn summaries(&self, project: &str, from_ms: u64, to_ms: u64) -> Result<Vec<(u64, Summary)>, Error> {
        if let Backend::Postgres(pool) = &self.backend {
            return pool.summaries(project, from_ms, to_ms);
        }
        let txn = self.redb()?.begin_read()?;
        let index = txn.open_table(BY_PROJECT)?;
        let mut out = Vec::new();
        if from_ms > to_ms {
            return Ok(out);
        }
        let range = index.range((project, from_ms, "")..(project, to_ms.saturating_add(1), ""))?;
        for entry in range {
            let (key, value) = entry?;
            let (_, created_ms, _) = key.value();
            // A value that does not parse was written by a newer relay: skipped, not fatal.
            if let Ok(summary) = serde_json::from_slice::<Summary>(value.value()) {
                out.push((created_ms, summary));
            }
        }
        Ok(out)
    }

    /// The `limit` most recently created calls of `project`, newest first.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn recent(&self, project: &str, limit: usize) -> Result<Vec<StoredCall>, Error> {
        if let Backend::Postgres(pool) = &self.backend {
            return pool.recent(project, limit);
        }
        let txn = self.redb()?.begin_read()?;
        let index = txn.open_table(BY_PROJECT)?;
        let calls = txn.open_table(CALLS)?;
        let mut out = Vec::new();
        for entry in index.range((project, 0, "")..=(project, u64::MAX, ""))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            let (_, _, id) = key.value();
            if let Some(value) = calls.get(id)? {
                if let Ok(call) = serde_json::from_slice::<StoredCall>(value.value()) {
                    out.push(call);
                }
            }
        }
        Ok(out)
    }

    /// Every node's calls created since `since_ms` that have not ended, oldest first, at most
    /// `limit`, and how many there are: the shared database only (the embedded one holds this
    /// node's calls, which `GET /calls` lists from the cores themselves).
    ///
    /// # Errors
    /// When the records are not shared, or the database cannot be read.
    pub fn live(&self, since_ms: u64, limit: usize) -> Result<(Vec<StoredCall>, u64), Error> {
        match &self.backend {
            Backend::Postgres(pool) => pool.live(since_ms, limit),
            Backend::Redb(_) => Err(Error::Database("the records are not shared (no --records-url)".to_owned())),
        }
    }

    /// The stored record of call `id`.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<StoredCall>, Error> {
        if let Backend::Postgres(pool) = &self.backend {
            return pool.get(id);
        }
        let txn = self.redb()?.begin_read()?;
        let calls = txn.open_table(CALLS)?;
        Ok(calls.get(id)?.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Opens a read transaction and the calls table: how long the database takes to answer.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn check(&self) -> Result<Duration, Error> {
        if let Backend::Postgres(pool) = &self.backend {
            return pool.check();
        }
        let start = Instant::now();
        let txn = self.redb()?.begin_read()?;
        let calls = txn.open_table(CALLS)?;
        let _ = calls.first()?;
        Ok(start.elapsed())
    }

    /// Upserts `changes` in one write transaction, keeping the project index in step.
    fn upsert<'a>(&self, changes: impl Iterator<Item = &'a RecordChange>) -> Result<(), Error> {
        let txn = self.redb()?.begin_write()?;
        {
            let mut calls = txn.open_table(CALLS)?;
            let mut index = txn.open_table(BY_PROJECT)?;
            for change in changes {
                let id = change.id.as_str();
                let older: Option<StoredCall> = calls.get(id)?.and_then(|v| serde_json::from_slice(v.value()).ok());
                let call = StoredCall::from_change(change, &self.projects, older.as_ref());
                if let Some(old) = &older {
                    index.remove((old.project_id.as_str(), old.created_ms, id))?;
                }
                let json = serde_json::to_vec(&call).map_err(std::io::Error::other)?;
                let summary = serde_json::to_vec(&call.summary()).map_err(std::io::Error::other)?;
                calls.insert(id, json.as_slice())?;
                index.insert((call.project_id.as_str(), call.created_ms, id), summary.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Rank of a Twilio call status: later states never give way to earlier ones.
fn status_rank(status: &str) -> u8 {
    match status {
        "initiated" => 1,
        "ringing" => 2,
        "in-progress" | "answered" => 3,
        "completed" | "busy" | "failed" | "no-answer" | "canceled" => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use relay_engine::id::SessionId;

    use super::*;

    fn change(id: &str, f: impl FnOnce(&mut CallRecord)) -> Box<RecordChange> {
        let mut record = CallRecord { status: "in-progress".into(), created_ms: 1_000, ..CallRecord::default() };
        f(&mut record);
        Box::new(RecordChange { id: SessionId::parse(id).expect("valid id"), record })
    }

    fn projects() -> Projects {
        Projects {
            by_number: [("+15550001".to_owned(), "proj_num".to_owned())].into(),
            default: "default".into(),
            names: [("proj_num".to_owned(), "Numbered".to_owned())].into(),
        }
    }

    /// A call's project: its own projectId, else its called number's, else its calling
    /// number's, else the default; names default to the id.
    #[test]
    fn projects_resolve() {
        let p = projects();
        let rec = |project: Option<&str>, from: Option<&str>, to: Option<&str>| CallRecord {
            project_id: project.map(Into::into),
            from: from.map(Into::into),
            to: to.map(Into::into),
            ..CallRecord::default()
        };
        assert_eq!(p.resolve(&rec(Some("p1"), None, Some("+15550001"))), "p1");
        assert_eq!(p.resolve(&rec(None, None, Some("+15550001"))), "proj_num");
        assert_eq!(p.resolve(&rec(None, Some("+15550001"), Some("+19999"))), "proj_num");
        assert_eq!(p.resolve(&rec(None, Some("+1"), Some("+2"))), "default");
        assert_eq!((p.name("proj_num"), p.name("other")), ("Numbered", "other"));
    }

    /// Changes are batched and committed; the latest snapshot wins; the project index follows a
    /// call that moves project; close commits what is left; a reopened store has it all.
    #[test]
    fn writes_batches_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("relay-records-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = RecordStore::open(&dir, projects()).expect("open");
        let sink = store.sink();
        sink.send(change("CA1", |r| r.to = Some("+15550001".into())));
        sink.send(change("CA1", |r| {
            r.to = Some("+15550001".into());
            r.project_id = Some("proj_a".into());
            r.intent = Some("emergency".into());
        }));
        sink.send(change("CA2", |r| {
            r.direction = Direction::Outbound;
            r.created_ms = 2_000;
        }));
        store.flush().expect("flush");
        let records = store.records();
        assert!(records.summaries("proj_num", 0, u64::MAX).expect("read").is_empty(), "moved to proj_a");
        let a = records.summaries("proj_a", 0, u64::MAX).expect("read");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].1.intent.as_deref(), Some("emergency"));
        assert_eq!(records.get("CA2").expect("read").expect("stored").direction, "outbound");
        assert_eq!(records.summaries("default", 0, 1_999).expect("read").len(), 0, "range excludes 2000");
        assert_eq!(records.summaries("default", 2_000, 2_000).expect("read").len(), 1, "range is inclusive");

        sink.send(change("CA3", |r| {
            r.start_ms = Some(10_000);
            r.end_ms = Some(14_900);
            r.status = "completed".into();
        }));
        drop(records);
        store.close().expect("close commits");
        sink.send(change("CA4", |_| {}));
        let store = RecordStore::open(&dir, projects()).expect("reopen");
        let ca3 = store.records().get("CA3").expect("read").expect("committed at close");
        assert_eq!((ca3.duration_secs, ca3.status.as_str()), (Some(4), "completed"));
        assert_eq!(store.records().get("CA4").expect("read"), None, "after close nothing is written");
        assert!(store.records().check().is_ok());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A record the core re-created (it had forgotten the call) keeps what the store knew.
    #[test]
    fn recreated_records_merge_with_the_stored_one() {
        let p = projects();
        let old = StoredCall::from_change(
            &change("CA1", |r| {
                r.project_id = Some("p1".into());
                r.direction = Direction::Outbound;
                r.from = Some("+1".into());
                r.start_ms = Some(1_000);
                r.end_ms = Some(5_000);
                r.status = "completed".into();
                r.transcript = "user: hi\n".into();
            }),
            &p,
            None,
        );
        let late = change("CA1", |r| {
            r.created_ms = 9_000;
            r.status = "queued".into();
            r.duration_secs = Some(7);
        });
        let merged = StoredCall::from_change(&late, &p, Some(&old));
        assert_eq!(merged.project_id, "p1");
        assert_eq!(merged.direction, "outbound");
        assert_eq!(merged.status, "completed");
        assert_eq!(merged.created_ms, 1_000);
        assert_eq!(merged.duration_secs, Some(7), "Twilio's duration wins");
        assert_eq!(merged.transcript, "user: hi\n");
        assert_eq!(merged.from.as_deref(), Some("+1"));
        // Another node's record of the call, made by a clock that is behind: merged the same way.
        let skewed = change("CA1", |r| {
            r.created_ms = 500;
            r.status = "ringing".into();
        });
        let merged = StoredCall::from_change(&skewed, &p, Some(&old));
        assert_eq!(
            (merged.created_ms, merged.status.as_str(), merged.direction.as_str()),
            (500, "completed", "outbound")
        );
        assert_eq!(merged.transcript, "user: hi\n");
    }

    /// With PostgreSQL unreachable the writer keeps each call's latest change (counted as
    /// pending, none dropped), a flush fails saying the database is unavailable without the URL's
    /// password, and reads answer "unavailable".
    #[test]
    fn an_unreachable_shared_database_keeps_the_changes() {
        let settings = postgres::Settings::parse("postgresql://relay:hunter2@127.0.0.1:1/relay").expect("valid");
        let records = Records {
            backend: Backend::Postgres(Arc::new(postgres::Pool::new(settings.clone()))),
            projects: Arc::new(projects()),
        };
        let writer = postgres::Writer::new(settings, "n1".into());
        let store = RecordStore::start(records, Target::Postgres(Box::new(writer))).expect("writer thread");
        let sink = store.sink();
        sink.send(change("CA1", |_| {}));
        sink.send(change("CA1", |r| r.status = "completed".into()));
        sink.send(change("CA2", |_| {}));
        let e = store.flush().expect_err("nothing to write to");
        assert!(e.contains("unavailable") && !e.contains("hunter2"), "{e}");
        let stats = store.stats();
        assert_eq!(stats.pending.load(Ordering::Relaxed), 2, "one held change per call");
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert!(stats.failing.load(Ordering::Relaxed));
        let read = store.records().get("CA1").expect_err("no database");
        assert!(read.is_unavailable() && !read.to_string().contains("hunter2"), "{read}");
    }

    /// Records and summaries written before function calls were counted (or nodes named) read back
    /// with 0 (and no node).
    #[test]
    fn old_records_read_without_function_calls() {
        let old =
            r#"{"id":"CA1","projectId":"p","direction":"inbound","status":"completed","transcript":"","createdMs":1}"#;
        let call: StoredCall = serde_json::from_str(old).expect("an old record");
        assert_eq!(call.function_calls, 0);
        assert_eq!(call.node, "", "records written before nodes were named have none");
        let summary: Summary = serde_json::from_str(r#"{"status":"completed"}"#).expect("an old summary");
        assert_eq!(summary.function_calls, 0);
    }
}
