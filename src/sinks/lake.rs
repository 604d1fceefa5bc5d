//! The Parquet dataset on object storage: the real [`FileSink`].
//!
//! Files are written to a staging prefix *beside* the dataset root (`<root>.staging/`, or
//! `_cfaudit_staging/` when the root is a bucket's top), never inside it: DuckDB, Spark and
//! Athena read every `*.parquet` under the root. Publishing is a rename that refuses to
//! overwrite, so publishing twice is harmless.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cfaudit_actors::failpoints::{self, crash_point};
use cfaudit_actors::{
    partition_of, staged_name, AuditRow, CommittedFile, FileSink, SinkError, StagedFile,
};

use crate::settings::LakeSettings;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, RetryConfig};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

pub struct ParquetLake {
    store: Arc<dyn ObjectStore>,
    root: Path,
    staging: Path,
    /// The staging folder when the store is the local filesystem (see `list_staged`).
    local_staging: Option<std::path::PathBuf>,
    props: WriterProperties,
}

fn lake_error(what: &str, error: impl std::fmt::Display) -> SinkError {
    SinkError::transient(format!("parquet {what}: {error}"))
}

impl ParquetLake {
    /// Opens the dataset at `url` with object_store's own URL and option parsing; `options`
    /// are object_store keys such as `aws_endpoint` (see `Config::storage_options`).
    ///
    /// Publishing needs copy-if-not-exists: on S3 it defaults to the multipart method (the
    /// one S3, MinIO and s3s honour); `AWS_COPY_IF_NOT_EXISTS` overrides it.
    pub fn open(settings: &LakeSettings) -> anyhow::Result<ParquetLake> {
        let (url, options) = (&settings.parquet_url, &settings.storage_options);
        let parsed =
            url::Url::parse(url).map_err(|e| anyhow::anyhow!("PARQUET_URL {url:?}: {e}"))?;
        let defaults = [("aws_copy_if_not_exists".to_owned(), "multipart".to_owned())];
        let options: Vec<(String, String)> = defaults
            .into_iter()
            .chain(
                options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_owned())),
            )
            .collect();
        // The errors name the scheme, never the options: they hold credentials.
        let scheme = parsed.scheme().to_owned();
        let scheme_error =
            move |e: object_store::Error| anyhow::anyhow!("PARQUET_URL ({scheme} storage): {e}");
        let (scheme, path) = ObjectStoreScheme::parse(&parsed)
            .map_err(|e| anyhow::anyhow!("PARQUET_URL ({} storage): {e}", parsed.scheme()))?;
        let root = Path::parse(path).map_err(|e| anyhow::anyhow!("PARQUET_URL path: {e}"))?;
        let store: Arc<dyn ObjectStore> = match scheme {
            // object_store retries a failing request for up to 3 minutes by default; bounded
            // here so an outage reaches the pipeline (not-ready, back-off, rewind) in ~20 s.
            ObjectStoreScheme::AmazonS3 => {
                let builder =
                    options
                        .iter()
                        .fold(AmazonS3Builder::new().with_url(url), |b, (k, v)| {
                            match k.parse::<AmazonS3ConfigKey>() {
                                Ok(key) => b.with_config(key, v),
                                Err(_) => b,
                            }
                        });
                let retry = RetryConfig {
                    max_retries: 4,
                    retry_timeout: Duration::from_secs(20),
                    ..RetryConfig::default()
                };
                Arc::new(builder.with_retry(retry).build().map_err(scheme_error)?)
            }
            // fsync of every written file and of the directories that name it: a file a
            // commit refers to survives a power cut, staged or published.
            ObjectStoreScheme::Local => Arc::new(LocalFileSystem::new().with_fsync(true)),
            _ => Arc::from(
                object_store::parse_url_opts(&parsed, options)
                    .map_err(scheme_error)?
                    .0,
            ),
        };
        let mut lake = ParquetLake::new(store, root);
        if scheme == ObjectStoreScheme::Local {
            lake.local_staging = Some(std::path::PathBuf::from("/").join(lake.staging.as_ref()));
        }
        Ok(lake)
    }

    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> ParquetLake {
        let staging = if root.as_ref().is_empty() {
            Path::from("_cfaudit_staging")
        } else {
            Path::from(format!("{}.staging", root.as_ref()))
        };
        let props = crate::sinks::dataset::DISTINCT_TEXT
            .iter()
            .fold(
                WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default())),
                |props, column| {
                    props.set_column_dictionary_enabled(ColumnPath::from(*column), false)
                },
            )
            .build();
        ParquetLake {
            store,
            root,
            staging,
            local_staging: None,
            props,
        }
    }

    /// On the local filesystem, publishing renames a file from the staging folder into the
    /// dataset, which cannot cross filesystems: both folders are created here and refused
    /// when they are not on the same one (a volume mounted at the dataset folder itself).
    pub fn check_layout(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Some(staging) = &self.local_staging else {
            return Ok(());
        };
        let root = std::path::PathBuf::from("/").join(self.root.as_ref());
        let device = |dir: &std::path::Path| -> anyhow::Result<u64> {
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::metadata(dir))
                .map(|m| m.dev())
                .map_err(|e| anyhow::anyhow!("PARQUET_URL: cannot create {}: {e}", dir.display()))
        };
        if device(&root)? != device(staging)? {
            let parent = root.parent().unwrap_or(&root);
            return Err(crate::settings::ConfigError {
                key: "PARQUET_URL".into(),
                problem: format!(
                    "the dataset folder {} and its staging folder {} are on different filesystems \
                     (a volume mounted at the dataset folder?); files are published by renaming them \
                     from one to the other, which cannot cross filesystems",
                    root.display(),
                    staging.display()
                ),
                fix: format!(
                    "mount the volume one level up (at {}) so that both folders are on it, or point \
                     PARQUET_URL at a folder inside the volume",
                    parent.display()
                ),
            }
            .into());
        }
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The dataset root in the store (every final file is below it).
    pub fn dataset_root(&self) -> &Path {
        &self.root
    }

    fn final_location(&self, final_path: &str) -> Path {
        Path::from(format!("{}/{final_path}", self.root.as_ref()).trim_start_matches('/'))
    }
}

/// Encodes the rows as one zstd Parquet file in memory.
fn encode(rows: &[&AuditRow], props: WriterProperties) -> Result<Vec<u8>, SinkError> {
    let batch = crate::sinks::dataset::record_batch(rows).map_err(|e| lake_error("encode", e))?;
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))
        .map_err(|e| lake_error("writer", e))?;
    writer.write(&batch).map_err(|e| lake_error("write", e))?;
    writer.into_inner().map_err(|e| lake_error("finish", e))
}

impl ParquetLake {
    /// Writes, reads back and deletes a small object in the staging area (`cfaudit check`);
    /// returns where.
    pub async fn probe(&self) -> Result<String, SinkError> {
        let location = self
            .staging
            .clone()
            .join(format!("probe-{}", uuid::Uuid::new_v4().simple()).as_str());
        let payload = b"cfaudit check".to_vec();
        self.store
            .put(&location, PutPayload::from(payload.clone()))
            .await
            .map_err(|e| lake_error("probe write", e))?;
        let read = self
            .store
            .get(&location)
            .await
            .map_err(|e| lake_error("probe read", e))?;
        let bytes = read
            .bytes()
            .await
            .map_err(|e| lake_error("probe read", e))?;
        self.store
            .delete(&location)
            .await
            .map_err(|e| lake_error("probe delete", e))?;
        if bytes.as_ref() != payload.as_slice() {
            return Err(SinkError::transient("probe read back different bytes"));
        }
        Ok(format!("{}/", self.staging))
    }
}

impl ParquetLake {
    /// The names in the staging area starting with `prefix`, without touching anything
    /// (`cfaudit status` reads them while the service may be writing).
    pub async fn staged_names(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let listed: Vec<_> = match self.store.list(Some(&self.staging)).try_collect().await {
            Ok(listed) => listed,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(lake_error("list staging", e)),
        };
        Ok(listed
            .into_iter()
            .filter_map(|meta| meta.location.filename().map(str::to_owned))
            .filter(|name| name.starts_with(prefix) && name.ends_with(".parquet"))
            .collect())
    }

    /// Deletes a staged file; one already gone is fine.
    async fn discard_one(&self, location: &Path) -> Result<(), SinkError> {
        match self.store.delete(location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(lake_error("delete a staged file", e)),
        }
    }
}

#[async_trait]
impl FileSink for ParquetLake {
    async fn stage(
        &self,
        stream: &str,
        lease: u64,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError> {
        // Encoding is CPU work: off the actors' thread, onto the blocking pool.
        let props = self.props.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            // Keyed by the hour, named once per file.
            let mut by_hour: BTreeMap<DateTime<Utc>, Vec<&AuditRow>> = BTreeMap::new();
            for row in rows.iter() {
                let hour = row
                    .timestamp
                    .duration_trunc(TimeDelta::hours(1))
                    .unwrap_or(row.timestamp);
                by_hour.entry(hour).or_default().push(row);
            }
            by_hour
                .into_iter()
                .map(|(hour, rows)| {
                    let partition = partition_of(hour);
                    Ok((partition, rows.len() as u64, encode(&rows, props.clone())?))
                })
                .collect::<Result<Vec<_>, SinkError>>()
        })
        .await
        .map_err(|e| lake_error("encode task", e))??;
        let mut staged = Vec::with_capacity(encoded.len());
        for (partition, row_count, bytes) in encoded {
            let name = staged_name(stream, lease, &uuid::Uuid::new_v4().simple().to_string());
            let location = self.staging.clone().join(name.as_str());
            let size = bytes.len() as u64;
            self.store
                .put(&location, PutPayload::from(bytes))
                .await
                .map_err(|e| lake_error("stage", e))?;
            staged.push(StagedFile {
                staged_path: name,
                partition,
                rows: row_count,
                bytes: size,
            });
        }
        Ok(staged)
    }

    /// A copy that refuses to overwrite, then the staged copy's deletion: what
    /// `rename_if_not_exists` does on S3 and on the local filesystem, in two steps so the
    /// crash tests can stop between them.
    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError> {
        for (i, file) in files.iter().enumerate() {
            if i > 0 {
                crash_point(failpoints::BETWEEN_PUBLISHED_FILES);
            }
            let from = self.staging.clone().join(file.staged_path.as_str());
            let to = self.final_location(&file.final_path);
            match self.store.copy_if_not_exists(&from, &to).await {
                Ok(()) => {
                    crash_point(failpoints::COPIED_NOT_DELETED);
                    self.discard_one(&from).await?;
                }
                // Published before a crash, staged copy left behind: drop it.
                Err(object_store::Error::AlreadyExists { .. }) => self.discard_one(&from).await?,
                // Published and cleaned up before: nothing to do if the final file is there.
                Err(object_store::Error::NotFound { .. }) => match self.store.head(&to).await {
                    Ok(_) => {}
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(SinkError::Lost {
                            final_path: file.final_path.clone(),
                            message: format!(
                                "the staged file {} and the final file are both missing",
                                file.staged_path
                            ),
                        })
                    }
                    Err(e) => return Err(lake_error("publish", e)),
                },
                Err(e) => return Err(lake_error("publish", e)),
            }
        }
        Ok(())
    }

    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError> {
        for (i, path) in staged_paths.iter().enumerate() {
            if i > 0 {
                crash_point(failpoints::BETWEEN_DISCARDED_FILES);
            }
            self.discard_one(&self.staging.clone().join(path.as_str()))
                .await?;
        }
        Ok(())
    }

    /// The staged files of one stream. On the local filesystem, object_store writes a file as
    /// `name#N` and renames it, and hides such names from listings: a process killed mid-write
    /// leaves one behind that no listing shows. Only a dead writer leaves them, so the
    /// stream's own are removed here, during its recovery.
    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        if let Some(dir) = &self.local_staging {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let partial = name
                        .to_str()
                        .filter(|n| n.starts_with(prefix))
                        .and_then(|n| n.rsplit_once('#'))
                        .is_some_and(|(_, n)| {
                            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                        });
                    if partial {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        self.staged_names(prefix).await
    }
}
