//! Resource containers (`ResourceMgr`, keyed by container and shared name) and `Variable`, the
//! resource behind `VariableV2`.

use crate::{DType, Error, PartialShape, Result, Tensor};
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// The container used when a stateful op names none.
pub const DEFAULT_CONTAINER: &str = "";

/// A resource kept in a `ResourceMgr`.
pub trait Resource: Any + Send + Sync {
    /// A short description for errors and debugging.
    fn describe(&self) -> String;
}

type Entry = (Arc<dyn Any + Send + Sync>, &'static str);

/// Resources by `(container, shared_name)`. Sessions own one per device; servers keep theirs
/// for all sessions until `reset` clears containers.
#[derive(Default)]
pub struct ResourceMgr {
    map: Mutex<BTreeMap<(String, String), Entry>>,
}

impl fmt::Debug for ResourceMgr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResourceMgr({} resources)", self.lock().len())
    }
}

impl ResourceMgr {
    pub fn new() -> ResourceMgr {
        ResourceMgr::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts),
        // so a poisoned lock is still safe to use.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resource `(container, name)`, created by `create` when absent. Finding a resource of
    /// another type under that name is `InvalidArgument`.
    pub fn lookup_or_create<T: Resource>(
        &self,
        container: &str,
        name: &str,
        create: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let mut m = self.lock();
        let key = (container.to_string(), name.to_string());
        if let Some((r, ty)) = m.get(&key) {
            return r.clone().downcast::<T>().map_err(|_| {
                Error::invalid_argument(format!(
                    "resource '{container}/{name}' is a {ty}, not a {}",
                    std::any::type_name::<T>()
                ))
            });
        }
        let r = Arc::new(create()?);
        m.insert(key, (r.clone(), std::any::type_name::<T>()));
        Ok(r)
    }

    pub fn lookup<T: Resource>(&self, container: &str, name: &str) -> Result<Arc<T>> {
        let m = self.lock();
        let (r, ty) = m
            .get(&(container.to_string(), name.to_string()))
            .ok_or_else(|| Error::not_found(format!("resource '{container}/{name}' does not exist")))?;
        r.clone().downcast::<T>().map_err(|_| {
            Error::invalid_argument(format!(
                "resource '{container}/{name}' is a {ty}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }

    pub fn delete(&self, container: &str, name: &str) -> bool {
        self.lock().remove(&(container.to_string(), name.to_string())).is_some()
    }

    /// Drops every resource of the named containers (all containers when `containers` is empty).
    pub fn cleanup(&self, containers: &[String]) {
        let mut m = self.lock();
        if containers.is_empty() {
            m.clear();
        } else {
            m.retain(|(c, _), _| !containers.contains(c));
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// `(container, name, type)` of each resource.
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        self.lock().iter().map(|((c, n), (_, t))| (c.clone(), n.clone(), *t)).collect()
    }
}

/// A variable: a tensor slot updated in place when no reader shares its buffer, and copied on
/// write otherwise, so a value read by one step is never torn by another step's update.
pub struct Variable {
    pub name: String,
    pub dtype: DType,
    pub shape: PartialShape,
    value: Mutex<Option<Tensor>>,
}

impl Resource for Variable {
    fn describe(&self) -> String {
        format!("Variable {} {} {}", self.name, self.dtype, self.shape)
    }
}

impl fmt::Debug for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Variable {
    pub fn new(name: &str, dtype: DType, shape: PartialShape) -> Variable {
        Variable { name: name.to_string(), dtype, shape, value: Mutex::new(None) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Tensor>> {
        self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_initialized(&self) -> bool {
        self.lock().is_some()
    }

    /// Bytes of the current value (0 when unset).
    pub fn byte_size(&self) -> usize {
        self.lock().as_ref().map_or(0, Tensor::byte_size)
    }

    /// The current value (shares the buffer); `FailedPrecondition` naming the variable when unset.
    pub fn read(&self) -> Result<Tensor> {
        self.lock().clone().ok_or_else(|| self.uninitialized())
    }

    fn uninitialized(&self) -> Error {
        Error::failed_precondition(format!("Attempting to use uninitialized value {}", self.name))
    }

    /// Replaces the value. With `validate_shape`, the value must fit the declared shape.
    pub fn assign(&self, t: Tensor, validate_shape: bool) -> Result<Tensor> {
        if t.dtype() != self.dtype {
            return Err(Error::invalid_argument(format!(
                "cannot assign a {} value to variable {} of dtype {}",
                t.dtype(),
                self.name,
                self.dtype
            )));
        }
        if validate_shape && !self.shape.is_compatible_with(t.shape()) {
            return Err(Error::invalid_argument(format!(
                "cannot assign a value of shape {} to variable {} of shape {}",
                t.shape(),
                self.name,
                self.shape
            )));
        }
        *self.lock() = Some(t.clone());
        Ok(t)
    }

    /// Updates the value in place through `f`; the buffer is copied first only if a reader
    /// still holds it. Returns the new value.
    pub fn update(&self, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<Tensor> {
        let mut g = self.lock();
        let t = g.as_mut().ok_or_else(|| self.uninitialized())?;
        f(t)?;
        Ok(t.clone())
    }

    /// Runs `f` on the value under the variable's lock (for multi-variable updates like Adam's).
    pub fn with_value<R>(&self, f: impl FnOnce(&mut Option<Tensor>) -> R) -> R {
        f(&mut self.lock())
    }
}
