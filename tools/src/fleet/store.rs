//! Artifact bytes, keyed by SHA-256, in an object store: a local folder (`DATA/artifacts`) by
//! default, or any URL `object_store` parses (`file:///…`, `memory://`; `s3://…` once the
//! store's cloud features are built in).

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

    /// A store by URL.
    ///
    /// # Errors
    /// The URL is not one the built-in stores handle.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let parsed =
            url::Url::parse(url).with_context(|| format!("store URL `{url}` does not parse"))?;
        let (store, prefix) = object_store::parse_url(&parsed).with_context(|| {
            format!("store URL `{url}` is not supported by this build; hint: leave --store out for a local folder in the data folder")
        })?;
        Ok(Store {
            inner: Arc::from(store),
            prefix,
        })
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
