//! The PostgreSQL backend of the call-record store (`--records-url`): every node of a cluster
//! writes its calls into one database, reads every node's calls from it, and counts per-user limits
//! there. Schema creation and migration run at start under an advisory lock, so nodes starting
//! together against an empty database all succeed.
//!
//! Invariant: every function here blocks on the network, so it runs only on the records writer
//! thread, the probe thread, the limits thread or the blocking pool, never on a core; the URL's
//! password never reaches a log line or an error (only [`Settings`]' redacted form does).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::types::Json;
use postgres::{Client, NoTls, Transaction};
use relay_engine::core::command::RecordChange;
use relay_engine::secret::Secret;

use super::{Error, Projects, StoredCall, Summary};

/// The schema version this relay writes; migrations up to it run at start.
pub const SCHEMA_VERSION: i32 = 1;
/// Key of the transaction-scoped advisory lock held while the schema is created or migrated
/// (an arbitrary constant: `"relay"` as bytes).
const SCHEMA_LOCK: i64 = 0x0072_656c_6179;
/// First key of the two-key advisory locks that serialise one user's limit checks across nodes
/// (`"rel"` as bytes).
const LIMITS_LOCK: i32 = 0x0072_656c;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connection, reads and limit checks answer "unavailable" at once for this long
/// instead of each waiting for a connect timeout of its own.
const DOWN_HOLD: Duration = Duration::from_secs(1);
/// Idle connections kept for reads and limit checks (blocking-pool threads share them).
const IDLE_CONNECTIONS: usize = 4;

/// Migrations by the version they bring the schema to; each runs once, in order, in the
/// transaction that holds [`SCHEMA_LOCK`].
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE relay_calls (
         id text PRIMARY KEY,
         project_id text NOT NULL,
         created_ms bigint NOT NULL,
         node text NOT NULL,
         summary jsonb NOT NULL,
         record jsonb NOT NULL
     );
     CREATE INDEX relay_calls_by_project ON relay_calls (project_id, created_ms, id);
     CREATE TABLE relay_user_sockets (
         user_id text NOT NULL,
         node text NOT NULL,
         instance text NOT NULL,
         socket_id bigint NOT NULL,
         since timestamptz NOT NULL DEFAULT now(),
         lease_until timestamptz NOT NULL,
         PRIMARY KEY (instance, socket_id)
     );
     CREATE INDEX relay_user_sockets_by_user ON relay_user_sockets (user_id, lease_until);
     CREATE TABLE relay_initiations (
         id bigserial PRIMARY KEY,
         user_id text NOT NULL,
         at timestamptz NOT NULL DEFAULT now()
     );
     CREATE INDEX relay_initiations_by_user ON relay_initiations (user_id, at);",
)];

/// A parsed `--records-url`: the client's settings and a printable form without the password.
#[derive(Clone)]
pub struct Settings {
    config: postgres::Config,
    redacted: String,
}

impl Settings {
    /// Parses a `postgresql://` (or `postgres://`) URL.
    ///
    /// # Errors
    /// When it is not such a URL or does not parse; the message never quotes the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            return Err("must be a postgresql:// or postgres:// URL".to_owned());
        }
        let mut config = postgres::Config::from_str(url).map_err(|_| {
            "is not a valid PostgreSQL URL (postgresql://user[:password]@host[:port]/database)".to_owned()
        })?;
        if config.get_hosts().is_empty() {
            return Err("must name a host (postgresql://user@host:port/database)".to_owned());
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .tcp_user_timeout(Duration::from_secs(10))
            .application_name("relay")
            // The server's notices ("relation … already exists, skipping") are not news.
            .notice_callback(|notice| tracing::debug!("records database: {}", notice.message()));
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
        let db = config.get_dbname().unwrap_or_default();
        let redacted = format!("postgresql://{user}{}/{db}", hosts.join(","));
        Ok(Self { config, redacted })
    }

    /// Parses the URL held in `url`.
    ///
    /// # Errors
    /// As [`Self::parse`].
    pub fn from_secret(url: &Secret) -> Result<Self, String> {
        Self::parse(url.expose())
    }

    fn connect(&self) -> Result<Client, Error> {
        self.config.connect(NoTls).map_err(|e| Error::Unavailable(chain(&e)))
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Settings({})", self.redacted)
    }
}

/// Connects and creates or migrates the schema, then removes what a previous life of `node` left
/// (its socket places: a node killed with `-9` and started again gives them back at once rather
/// than after their lease).
///
/// # Errors
/// When the database cannot be reached, or its schema is newer than this relay's.
pub fn prepare(settings: &Settings, node: &str) -> Result<(), Error> {
    let mut client = settings.connect()?;
    migrate(&mut client)?;
    client.execute("DELETE FROM relay_user_sockets WHERE node = $1", &[&node]).map_err(pg)?;
    Ok(())
}

/// Creates or migrates the schema in one transaction holding [`SCHEMA_LOCK`]: of several nodes
/// starting at once, one migrates and the others wait for it, then find nothing to do.
fn migrate(client: &mut Client) -> Result<(), Error> {
    let mut txn = client.transaction().map_err(pg)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).map_err(pg)?;
    txn.batch_execute("CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL)").map_err(pg)?;
    let version: i32 = txn.query_one("SELECT coalesce(max(version), 0) FROM relay_schema", &[]).map_err(pg)?.get(0);
    if version > SCHEMA_VERSION {
        return Err(Error::Database(format!(
            "the records database has schema version {version}, newer than this relay's {SCHEMA_VERSION}: upgrade the relay"
        )));
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
        txn.batch_execute(sql).map_err(pg)?;
        txn.execute("DELETE FROM relay_schema", &[]).map_err(pg)?;
        txn.execute("INSERT INTO relay_schema (version) VALUES ($1)", &[to]).map_err(pg)?;
        tracing::info!(version = to, "records database schema migrated");
    }
    txn.commit().map_err(pg)
}

/// A few idle connections shared by the blocking pool's reads and limit checks.
pub struct Pool {
    settings: Settings,
    idle: Mutex<Vec<Client>>,
    /// Until when a failed connection makes every caller answer "unavailable" at once.
    down_until: Mutex<Option<Instant>>,
}

impl Pool {
    /// A pool for `settings`; connects on first use.
    pub fn new(settings: Settings) -> Self {
        Self { settings, idle: Mutex::new(Vec::new()), down_until: Mutex::new(None) }
    }

    /// Runs `f` on a connection (an idle one, else a new one); a connection whose use failed
    /// for a reason other than the query itself is dropped, not kept.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the database cannot be reached, else what `f` returns.
    pub fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, Error>) -> Result<T, Error> {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => {
                if let Some(until) = *self.down_until.lock().unwrap_or_else(PoisonError::into_inner) {
                    if Instant::now() < until {
                        return Err(Error::Unavailable("not reachable a moment ago".to_owned()));
                    }
                }
                match self.settings.connect() {
                    Ok(c) => c,
                    Err(e) => {
                        *self.down_until.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Instant::now() + DOWN_HOLD);
                        return Err(e);
                    }
                }
            }
        };
        let result = f(&mut client);
        let keep = match &result {
            Ok(_) | Err(Error::Database(_)) => !client.is_closed(),
            Err(_) => false,
        };
        if keep {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(client);
            }
        }
        result
    }

    /// `SELECT 1`: how long the database takes to answer.
    ///
    /// # Errors
    /// When it does not.
    pub fn check(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.with(|c| c.simple_query("SELECT 1").map_err(pg))?;
        Ok(start.elapsed())
    }

    /// Every call of `project` created in `from_ms..=to_ms`, oldest first.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn summaries(&self, project: &str, from_ms: u64, to_ms: u64) -> Result<Vec<(u64, Summary)>, Error> {
        if from_ms > to_ms {
            return Ok(Vec::new());
        }
        let rows = self.with(|c| {
            c.query(
                "SELECT created_ms, summary FROM relay_calls
                 WHERE project_id = $1 AND created_ms BETWEEN $2 AND $3 ORDER BY created_ms, id",
                &[&project, &ms(from_ms), &ms(to_ms)],
            )
            .map_err(pg)
        })?;
        // A summary that does not parse was written by a newer relay: skipped, not fatal.
        Ok(rows
            .iter()
            .filter_map(|row| {
                let created: i64 = row.get(0);
                let Json(v): Json<serde_json::Value> = row.get(1);
                serde_json::from_value(v).ok().map(|s| (u64::try_from(created).unwrap_or(0), s))
            })
            .collect())
    }

    /// The `limit` most recently created calls of `project`, newest first.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn recent(&self, project: &str, limit: usize) -> Result<Vec<StoredCall>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.with(|c| {
            c.query(
                "SELECT record FROM relay_calls WHERE project_id = $1
                 ORDER BY created_ms DESC, id DESC LIMIT $2",
                &[&project, &limit],
            )
            .map_err(pg)
        })?;
        Ok(rows.iter().filter_map(|row| parse_call(row.get(0))).collect())
    }

    /// Calls of every node created since `since_ms` that have not ended (no end time, no final
    /// status), oldest first, at most `limit`, and how many there are.
    ///
    /// No index serves this (the schema has none on `created_ms` alone): the database reads the
    /// rows created since `since_ms`.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn live(&self, since_ms: u64, limit: usize) -> Result<(Vec<StoredCall>, u64), Error> {
        let since = i64::try_from(since_ms).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.with(|c| {
            c.query(
                "SELECT record, count(*) OVER () FROM relay_calls
                 WHERE created_ms >= $1 AND record->>'endMs' IS NULL
                   AND coalesce(record->>'status', '') NOT IN ('completed', 'busy', 'failed', 'no-answer', 'canceled')
                 ORDER BY created_ms, id LIMIT $2",
                &[&since, &limit],
            )
            .map_err(pg)
        })?;
        let total = rows.first().map_or(0, |row| u64::try_from(row.get::<_, i64>(1)).unwrap_or(0));
        Ok((rows.iter().filter_map(|row| parse_call(row.get(0))).collect(), total))
    }

    /// The stored record of call `id`.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<StoredCall>, Error> {
        let row = self.with(|c| c.query_opt("SELECT record FROM relay_calls WHERE id = $1", &[&id]).map_err(pg))?;
        Ok(row.and_then(|row| parse_call(row.get(0))))
    }

    /// Takes one of `user`'s `limit` socket places for socket `socket_id` of process `instance`
    /// of `node`, or says there is none left (`Ok(false)`). Places whose lease ran out (their
    /// node died) do not count.
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub fn acquire_socket(
        &self,
        user: &str,
        (node, instance): (&str, &str),
        socket_id: u64,
        limit: usize,
        lease: Duration,
    ) -> Result<bool, Error> {
        self.with(|c| {
            let mut txn = c.transaction().map_err(pg)?;
            lock_user(&mut txn, user)?;
            let held: i64 = txn
                .query_one(
                    "SELECT count(*) FROM relay_user_sockets WHERE user_id = $1 AND lease_until > now()",
                    &[&user],
                )
                .map_err(pg)?
                .get(0);
            if held >= i64::try_from(limit).unwrap_or(i64::MAX) {
                return Ok(false);
            }
            txn.execute(
                "INSERT INTO relay_user_sockets (user_id, node, instance, socket_id, lease_until)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                &[&user, &node, &instance, &id_i64(socket_id), &lease.as_secs_f64()],
            )
            .map_err(pg)?;
            txn.commit().map_err(pg)?;
            Ok(true)
        })
    }

    /// Records an initiation for `user` unless `limit` happened in the last `window`: the row's id
    /// (for a refund), or how long until the oldest of them leaves the window.
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub fn try_initiate(&self, user: &str, limit: usize, window: Duration) -> Result<Result<i64, Duration>, Error> {
        let secs = window.as_secs_f64();
        self.with(|c| {
            let mut txn = c.transaction().map_err(pg)?;
            lock_user(&mut txn, user)?;
            let row = txn
                .query_one(
                    "SELECT count(*), extract(epoch FROM min(at) + make_interval(secs => $2) - now())::float8
                     FROM relay_initiations WHERE user_id = $1 AND at > now() - make_interval(secs => $2)",
                    &[&user, &secs],
                )
                .map_err(pg)?;
            let (count, wait): (i64, Option<f64>) = (row.get(0), row.get(1));
            if count >= i64::try_from(limit).unwrap_or(i64::MAX) {
                let wait = Duration::try_from_secs_f64(wait.unwrap_or(0.0).max(0.0)).unwrap_or(window);
                return Ok(Err(wait));
            }
            let id: i64 = txn
                .query_one("INSERT INTO relay_initiations (user_id) VALUES ($1) RETURNING id", &[&user])
                .map_err(pg)?
                .get(0);
            txn.commit().map_err(pg)?;
            Ok(Ok(id))
        })
    }

    /// Gives back initiation `id` (Twilio refused the call).
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub fn refund(&self, id: i64) -> Result<(), Error> {
        self.with(|c| c.execute("DELETE FROM relay_initiations WHERE id = $1", &[&id]).map(drop).map_err(pg))
    }

    /// The limits thread's sweep for process `instance`: drops its socket rows not in `live`,
    /// renews the lease of the others, and removes every user's initiations older than `window`.
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub fn sweep(&self, instance: &str, live: &[u64], lease: Duration, window: Duration) -> Result<(), Error> {
        let live: Vec<i64> = live.iter().map(|&id| id_i64(id)).collect();
        self.with(|c| {
            c.execute(
                "DELETE FROM relay_user_sockets WHERE instance = $1 AND NOT (socket_id = ANY($2))",
                &[&instance, &live],
            )
            .map_err(pg)?;
            c.execute(
                "UPDATE relay_user_sockets SET lease_until = now() + make_interval(secs => $2) WHERE instance = $1",
                &[&instance, &lease.as_secs_f64()],
            )
            .map_err(pg)?;
            c.execute(
                "DELETE FROM relay_initiations WHERE at < now() - make_interval(secs => $1)",
                &[&window.as_secs_f64()],
            )
            .map_err(pg)?;
            Ok(())
        })
    }
}

/// The writer thread's connection: reconnects with backoff, (re)checks the schema on each
/// connection, and upserts batches.
pub struct Writer {
    settings: Settings,
    node: String,
    client: Option<Client>,
    /// No connection attempt before this (backoff after a failure).
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// First and longest pause between two connection attempts of the writer.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(4));

impl Writer {
    /// A writer for `settings`, naming `node` on the calls it creates.
    pub fn new(settings: Settings, node: String) -> Self {
        Self { settings, node, client: None, next_attempt: None, backoff: BACKOFF.0 }
    }

    /// Upserts `changes` in one transaction, each merged with the stored record under a row lock.
    ///
    /// # Errors
    /// When the database cannot be reached (the caller keeps the changes and retries) or refuses.
    pub fn upsert<'a>(
        &mut self,
        changes: impl Iterator<Item = &'a RecordChange>,
        projects: &Projects,
    ) -> Result<(), Error> {
        let node = self.node.clone();
        let client = self.client()?;
        let result = upsert(client, changes, projects, &node);
        if let Err(e) = &result {
            if !matches!(e, Error::Database(_)) || client.is_closed() {
                self.client = None;
                self.next_attempt = Some(Instant::now() + self.backoff);
            }
        }
        result
    }

    /// Lets the next commit connect at once, whatever the backoff says (a flush or the last
    /// commit at shutdown is worth one more try).
    pub fn retry_now(&mut self) {
        self.next_attempt = None;
    }

    fn client(&mut self) -> Result<&mut Client, Error> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            if self.next_attempt.is_some_and(|t| Instant::now() < t) {
                return Err(Error::Unavailable("reconnecting".to_owned()));
            }
            match self.settings.connect().and_then(|mut c| migrate(&mut c).map(|()| c)) {
                Ok(c) => {
                    self.client = Some(c);
                    self.next_attempt = None;
                    self.backoff = BACKOFF.0;
                }
                Err(e) => {
                    self.next_attempt = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF.1);
                    return Err(e);
                }
            }
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }
}

fn upsert<'a>(
    client: &mut Client,
    changes: impl Iterator<Item = &'a RecordChange>,
    projects: &Projects,
    node: &str,
) -> Result<(), Error> {
    let mut changes: Vec<&RecordChange> = changes.collect();
    // Rows are locked in id order, so two nodes writing the same calls cannot deadlock.
    changes.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    let ids: Vec<&str> = changes.iter().map(|c| c.id.as_str()).collect();
    let mut txn = client.transaction().map_err(pg)?;
    // Every row exists before it is read for update: a node writing a call another node is
    // inserting at the same moment waits for that insert, then merges with it (instead of both
    // inserting and the later overwriting the earlier unmerged). Placeholders are replaced below,
    // in this transaction: nobody ever sees one. A row keeps the node that first wrote it.
    txn.execute(
        "INSERT INTO relay_calls (id, project_id, created_ms, node, summary, record)
         SELECT id, '', 0, $2, '{}', 'null' FROM unnest($1::text[]) AS id ORDER BY id
         ON CONFLICT (id) DO NOTHING",
        &[&ids, &node],
    )
    .map_err(pg)?;
    let stored: HashMap<String, StoredCall> = txn
        .query("SELECT id, record FROM relay_calls WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&ids])
        .map_err(pg)?
        .iter()
        .filter_map(|row| Some((row.get::<_, String>(0), parse_call(row.get(1))?)))
        .collect();
    let statement = txn
        .prepare(
            "INSERT INTO relay_calls (id, project_id, created_ms, node, summary, record)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id, created_ms = EXCLUDED.created_ms,
                 summary = EXCLUDED.summary, record = EXCLUDED.record",
        )
        .map_err(pg)?;
    for change in changes {
        let id = change.id.as_str();
        let call = StoredCall::from_change(change, projects, stored.get(id));
        txn.execute(
            &statement,
            &[&id, &call.project_id, &ms(call.created_ms), &node, &Json(call.summary()), &Json(&call)],
        )
        .map_err(pg)?;
    }
    txn.commit().map_err(pg)
}

/// Serialises one user's limit checks across nodes until the transaction ends.
fn lock_user(txn: &mut Transaction<'_>, user: &str) -> Result<(), Error> {
    txn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LIMITS_LOCK, &user]).map_err(pg).map(drop)
}

fn parse_call(Json(v): Json<serde_json::Value>) -> Option<StoredCall> {
    serde_json::from_value(v).ok()
}

/// A PostgreSQL error as the store's: the server's own answer (SQL, constraint) is
/// [`Error::Database`]; a lost or refused connection is [`Error::Unavailable`].
fn pg(e: postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Database(db.to_string()),
        None => Error::Unavailable(chain(&e)),
    }
}

/// `e` and its causes, `: `-separated ("error connecting to server: Connection refused …").
fn chain(e: &postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn id_i64(id: u64) -> i64 {
    // Socket ids count up from 1 in one process; they never reach 2^63.
    i64::try_from(id).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL parses to settings whose printed form keeps user, host, port and database but
    /// never the password; anything else is refused without being quoted.
    #[test]
    fn settings_redact_the_password() {
        let s = Settings::parse("postgresql://relay:hunter2@db.example:6543/calls").expect("valid");
        assert_eq!(s.to_string(), "postgresql://relay@db.example:6543/calls");
        assert!(!format!("{s:?}").contains("hunter2"));
        let s = Settings::parse("postgres://relay@127.0.0.1/calls").expect("postgres:// too");
        assert_eq!(s.to_string(), "postgresql://relay@127.0.0.1:5432/calls");
        for bad in ["mysql://u:hunter2@h/db", "postgresql://u:hunter2@h:notaport/db", "hunter2"] {
            let e = Settings::parse(bad).expect_err(bad);
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    /// The migrations are numbered 1, 2, … up to the schema version, so each runs once in order.
    #[test]
    fn migrations_are_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    }
}
