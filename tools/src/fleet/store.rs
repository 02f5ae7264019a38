//! Artifact bytes, keyed by SHA-256, in an object store: a local folder (`DATA/artifacts`) by
//! default, or any URL `object_store` parses: `file:///…`, `memory://`, and S3 or an
//! S3-compatible server (`s3://bucket/prefix`), configured from the usual `AWS_*` environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION` or
//! `AWS_REGION`, `AWS_ENDPOINT` for another server, `AWS_ALLOW_HTTP=true` for plain HTTP to it).

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The artifact store.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl Store {
    /// A local folder (created if missing).
    ///
    /// # Errors
    /// The folder cannot be created or opened.
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the artifact folder {}", dir.display()))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("cannot open the artifact folder {}", dir.display()))?;
        Ok(Store {
            inner: Arc::new(fs),
            prefix: ObjectPath::default(),
        })
    }

    /// A store by URL; `s3://` takes its settings from the `AWS_*` environment variables.
    ///
    /// # Errors
    /// The URL does not parse or is not one the built-in stores handle, or its settings are
    /// incomplete.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| {
            anyhow::anyhow!("--store `{url}` does not parse ({e}); hint: e.g. s3://bucket/prefix")
        })?;
        // `AWS_ENDPOINT` → `aws_endpoint`, as the S3 builder's own `from_env` reads them.
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let (store, prefix) = object_store::parse_url_opts(&parsed, env).map_err(|e| {
            anyhow::anyhow!(
                "--store `{url}` cannot be used: {}; hint: file:///DIR, memory:// or s3://bucket/prefix (with AWS_* settings), or leave --store out for DATA/artifacts",
                one_line(&e)
            )
        })?;
        Ok(Store {
            inner: Arc::from(store),
            prefix,
        })
    }

    /// Lists the artifact folder once, so a store that cannot be reached, a missing bucket or
    /// refused credentials stop the server at start instead of failing the first push.
    ///
    /// # Errors
    /// The store answered with an error.
    pub async fn check(&self, url: &str) -> anyhow::Result<()> {
        let dir = self.prefix.clone().join("artifacts");
        match self.inner.list_with_delimiter(Some(&dir)).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::anyhow!(
                "cannot use the store {url}: {}; hint: check that the bucket exists and the AWS_* settings (credentials, AWS_DEFAULT_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP)",
                one_line(&e)
            )),
        }
    }

    fn key(&self, sha256: &str) -> ObjectPath {
        self.prefix.clone().join("artifacts").join(sha256)
    }

    /// Stores an artifact under its digest.
    ///
    /// # Errors
    /// The store fails.
    pub async fn put(&self, sha256: &str, bytes: Vec<u8>) -> object_store::Result<()> {
        self.inner
            .put(&self.key(sha256), PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    /// Bytes `range` of an artifact.
    ///
    /// # Errors
    /// The store fails or the object is missing.
    pub async fn get_range(
        &self,
        sha256: &str,
        range: Range<u64>,
    ) -> object_store::Result<axum::body::Bytes> {
        if range.is_empty() {
            return Ok(axum::body::Bytes::new());
        }
        self.inner.get_range(&self.key(sha256), range).await
    }
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.replace('\n', " ")
}
