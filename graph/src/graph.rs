//! The graph builder: a flat vector of nodes, closure scopes (device, name, variable, control
//! dependencies, colocation, container), and its serde form `GraphDef`.

use crate::op::{InferCtx, OpDef, TensorInfo};
use crate::{AttrValue, Attrs, AttrsExt, DType, DeviceName, Error, PartialShape, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::rc::Rc;

/// Index of a node in its graph.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// One output of a node: the end of a data edge.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Output {
    pub node: NodeId,
    pub index: u32,
}

impl Output {
    pub fn new(node: NodeId, index: u32) -> Output {
        Output { node, index }
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{}", self.node, self.index)
    }
}

/// Attribute naming the nodes a node must be colocated with (`loc:@name`), as in TensorFlow.
pub const COLOCATION_ATTR: &str = "_class";

/// A node: its op, inputs, requested device, attributes and inferred output types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeDef {
    pub name: String,
    pub op: String,
    pub inputs: Vec<Output>,
    pub control_inputs: Vec<NodeId>,
    /// The device asked for by scopes or device functions (may be partial or empty).
    pub device: String,
    pub attrs: Attrs,
    pub outputs: Vec<TensorInfo>,
}

impl NodeDef {
    /// Names of the nodes this one must be colocated with.
    pub fn colocation_names(&self) -> Vec<&str> {
        match self.attrs.get(COLOCATION_ATTR) {
            Some(AttrValue::Strs(v)) => v.iter().filter_map(|s| s.strip_prefix("loc:@")).collect(),
            _ => Vec::new(),
        }
    }
}

/// The serializable form of a graph (or of one partition of it): what travels to workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphDef {
    pub nodes: Vec<NodeDef>,
}

impl GraphDef {
    pub fn node(&self, id: NodeId) -> &NodeDef {
        &self.nodes[id.0 as usize]
    }

    /// Index of nodes by name.
    pub fn name_index(&self) -> HashMap<&str, NodeId> {
        self.nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), NodeId(i as u32))).collect()
    }

    /// Checks that every edge points at an existing earlier-or-later node and output, so a
    /// `GraphDef` that came from a file or a peer cannot make later stages index out of range.
    pub fn validate(&self) -> Result<()> {
        let n = self.nodes.len();
        let mut names = HashMap::with_capacity(n);
        for (i, node) in self.nodes.iter().enumerate() {
            if names.insert(node.name.as_str(), i).is_some() {
                return Err(Error::invalid_argument(format!("duplicate node name '{}'", node.name)));
            }
            for inp in &node.inputs {
                let src = self.nodes.get(inp.node.0 as usize).ok_or_else(|| {
                    Error::invalid_argument(format!("node '{}' has an input from a missing node", node.name))
                })?;
                if inp.index as usize >= src.outputs.len() {
                    return Err(Error::invalid_argument(format!(
                        "node '{}' reads output {} of '{}', which has {} outputs",
                        node.name,
                        inp.index,
                        src.name,
                        src.outputs.len()
                    )));
                }
            }
            for c in &node.control_inputs {
                if c.0 as usize >= n {
                    return Err(Error::invalid_argument(format!(
                        "node '{}' has a control input from a missing node",
                        node.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A device scope: a fixed (partial) device name, or a function called for each new node.
#[derive(Clone)]
pub enum DeviceScope {
    Name(DeviceName),
    Func(Rc<dyn Fn(&NodeDef) -> DeviceName>),
}

impl DeviceScope {
    pub fn func(f: impl Fn(&NodeDef) -> DeviceName + 'static) -> DeviceScope {
        DeviceScope::Func(Rc::new(f))
    }
}

impl From<&str> for DeviceScope {
    fn from(s: &str) -> DeviceScope {
        // A malformed name is kept as given and reported when the node is placed.
        DeviceScope::Name(
            DeviceName::parse(s).unwrap_or_else(|_| DeviceName {
                job: Some(format!("<malformed:{s}>")),
                ..Default::default()
            }),
        )
    }
}

impl From<String> for DeviceScope {
    fn from(s: String) -> DeviceScope {
        DeviceScope::from(s.as_str())
    }
}

impl From<DeviceName> for DeviceScope {
    fn from(d: DeviceName) -> DeviceScope {
        DeviceScope::Name(d)
    }
}

/// Whether `get_variable` may return an existing variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Creating is required; an existing variable is an error.
    No,
    /// Reusing is required; a missing variable is an error.
    Yes,
    /// Reuse when it exists, create otherwise (TF's `AUTO_REUSE`).
    Auto,
}

/// What the graph records about each variable it created.
#[derive(Clone, Debug)]
pub struct VariableInfo {
    pub name: String,
    pub var: Output,
    pub initializer: NodeId,
    pub initial_value: Output,
    pub trainable: bool,
    /// In the global-variables collection (saved by default, initialised by
    /// `global_variables_initializer`); preloaded data can be left out.
    pub global: bool,
    pub dtype: DType,
    pub shape: PartialShape,
}

/// Options of a new variable.
#[derive(Clone, Debug)]
pub struct VariableOptions {
    pub trainable: bool,
    pub global: bool,
    pub validate_shape: bool,
}

impl Default for VariableOptions {
    fn default() -> Self {
        VariableOptions { trainable: true, global: true, validate_shape: true }
    }
}

#[derive(Default)]
struct Scopes {
    devices: Vec<DeviceScope>,
    name_scope: String,
    var_scope: String,
    reuse: Vec<Reuse>,
    control: Vec<NodeId>,
    colocate: Option<NodeId>,
    container: Option<String>,
}

#[derive(Default)]
struct Inner {
    nodes: Vec<NodeDef>,
    names: HashMap<String, NodeId>,
    name_counts: HashMap<String, usize>,
    scopes: Scopes,
    error: Option<Error>,
    variables: Vec<VariableInfo>,
    var_by_name: HashMap<String, usize>,
    collections: BTreeMap<String, Vec<NodeId>>,
}

/// A dataflow graph under construction. Builder methods take `&self` so calls nest
/// (`g.add(g.matmul(x, w), b)`); the first build error is kept and reported by `status()` and by
/// any session created from the graph.
#[derive(Default)]
pub struct Graph {
    inner: RefCell<Inner>,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Graph({} nodes)", self.inner.borrow().nodes.len())
    }
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// The first error met while building, naming the node; `Ok` when the graph is sound.
    pub fn status(&self) -> Result<()> {
        match &self.inner.borrow().error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn record_error(&self, e: Error) {
        let mut inner = self.inner.borrow_mut();
        if inner.error.is_none() {
            inner.error = Some(e);
        }
    }

    pub fn num_nodes(&self) -> usize {
        self.inner.borrow().nodes.len()
    }

    /// A copy of node `id`.
    pub fn node(&self, id: NodeId) -> NodeDef {
        self.inner.borrow().nodes[id.0 as usize].clone()
    }

    pub fn node_name(&self, id: NodeId) -> String {
        self.inner.borrow().nodes[id.0 as usize].name.clone()
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.inner.borrow().names.get(name).copied()
    }

    /// The output named `node:index` (or `node` for index 0).
    pub fn output_by_name(&self, name: &str) -> Result<Output> {
        let (n, i) = match name.rsplit_once(':') {
            Some((n, i)) if i.parse::<u32>().is_ok() => (n, i.parse().unwrap_or(0)),
            _ => (name, 0),
        };
        let id = self.find(n).ok_or_else(|| Error::not_found(format!("no node named '{n}'")))?;
        Ok(Output::new(id, i))
    }

    pub fn dtype(&self, o: Output) -> DType {
        self.info(o).map(|i| i.dtype).unwrap_or(DType::F32)
    }

    pub fn shape(&self, o: Output) -> PartialShape {
        self.info(o).map(|i| i.shape).unwrap_or_default()
    }

    pub fn info(&self, o: Output) -> Option<TensorInfo> {
        let inner = self.inner.borrow();
        inner.nodes.get(o.node.0 as usize)?.outputs.get(o.index as usize).cloned()
    }

    /// The serde form of the whole graph.
    pub fn to_graph_def(&self) -> GraphDef {
        GraphDef { nodes: self.inner.borrow().nodes.clone() }
    }

    /// Rebuilds a graph from its serde form (no scopes, no variable records).
    pub fn from_graph_def(def: &GraphDef) -> Result<Graph> {
        def.validate()?;
        let g = Graph::new();
        {
            let mut inner = g.inner.borrow_mut();
            for (i, n) in def.nodes.iter().enumerate() {
                inner.names.insert(n.name.clone(), NodeId(i as u32));
            }
            inner.nodes = def.nodes.clone();
        }
        Ok(g)
    }

    pub fn variables(&self) -> Vec<VariableInfo> {
        self.inner.borrow().variables.clone()
    }

    pub fn trainable_variables(&self) -> Vec<VariableInfo> {
        self.variables().into_iter().filter(|v| v.trainable).collect()
    }

    pub fn global_variables(&self) -> Vec<VariableInfo> {
        self.variables().into_iter().filter(|v| v.global).collect()
    }

    pub fn add_to_collection(&self, name: &str, node: NodeId) {
        self.inner.borrow_mut().collections.entry(name.to_string()).or_default().push(node);
    }

    pub fn collection(&self, name: &str) -> Vec<NodeId> {
        self.inner.borrow().collections.get(name).cloned().unwrap_or_default()
    }

    // ---- scopes ----

    /// Runs `f` with a device scope: a device name (`"/job:ps/task:0"`) or a device function.
    pub fn with_device<R>(&self, scope: impl Into<DeviceScope>, f: impl FnOnce(&Graph) -> R) -> R {
        self.inner.borrow_mut().scopes.devices.push(scope.into());
        let r = f(self);
        self.inner.borrow_mut().scopes.devices.pop();
        r
    }

    /// Runs `f` with names prefixed by `name/`. The scope name is made unique like node names.
    pub fn with_name_scope<R>(&self, name: &str, f: impl FnOnce(&Graph) -> R) -> R {
        let prev = {
            let mut inner = self.inner.borrow_mut();
            let full = format!("{}{}", inner.scopes.name_scope, name);
            let unique = unique_name(&mut inner, &full);
            std::mem::replace(&mut inner.scopes.name_scope, format!("{unique}/"))
        };
        let r = f(self);
        self.inner.borrow_mut().scopes.name_scope = prev;
        r
    }

    /// Runs `f` inside a variable scope: `get_variable` names are prefixed with `name/`, and
    /// `reuse` says whether existing variables are returned. Op names get the same prefix.
    pub fn variable_scope<R>(&self, name: &str, reuse: Reuse, f: impl FnOnce(&Graph) -> R) -> R {
        let (prev_var, prev_name) = {
            let mut inner = self.inner.borrow_mut();
            let var = format!("{}{}/", inner.scopes.var_scope, name);
            let full = format!("{}{}", inner.scopes.name_scope, name);
            let unique = unique_name(&mut inner, &full);
            inner.scopes.reuse.push(reuse);
            (
                std::mem::replace(&mut inner.scopes.var_scope, var),
                std::mem::replace(&mut inner.scopes.name_scope, format!("{unique}/")),
            )
        };
        let r = f(self);
        let mut inner = self.inner.borrow_mut();
        inner.scopes.var_scope = prev_var;
        inner.scopes.name_scope = prev_name;
        inner.scopes.reuse.pop();
        r
    }

    /// Runs `f` with every new node depending on `deps` (control edges).
    pub fn with_control_dependencies<R>(&self, deps: &[Output], f: impl FnOnce(&Graph) -> R) -> R {
        let n = {
            let mut inner = self.inner.borrow_mut();
            let n = inner.scopes.control.len();
            inner.scopes.control.extend(deps.iter().map(|o| o.node));
            n
        };
        let r = f(self);
        self.inner.borrow_mut().scopes.control.truncate(n);
        r
    }

    /// Runs `f` with no control dependencies from enclosing scopes (TF's
    /// `control_dependencies(None)`): variables and their initial values are made this way.
    pub fn without_control_dependencies<R>(&self, f: impl FnOnce(&Graph) -> R) -> R {
        let saved = std::mem::take(&mut self.inner.borrow_mut().scopes.control);
        let r = f(self);
        self.inner.borrow_mut().scopes.control = saved;
        r
    }

    /// Runs `f` with new nodes colocated with `op` (same device, placed as one group).
    pub fn colocate_with<R>(&self, op: Output, f: impl FnOnce(&Graph) -> R) -> R {
        let prev = self.inner.borrow_mut().scopes.colocate.replace(op.node);
        let r = f(self);
        self.inner.borrow_mut().scopes.colocate = prev;
        r
    }

    /// Runs `f` with stateful ops (variables, queues) created in resource container `name`.
    pub fn with_container<R>(&self, name: &str, f: impl FnOnce(&Graph) -> R) -> R {
        let prev = self.inner.borrow_mut().scopes.container.replace(name.to_string());
        let r = f(self);
        self.inner.borrow_mut().scopes.container = prev;
        r
    }

    /// The current name-scope prefix (`"tower_0/"`, or empty).
    pub fn name_scope(&self) -> String {
        self.inner.borrow().scopes.name_scope.clone()
    }

    // ---- nodes ----

    /// Adds a node of `op` with a unique name derived from `name` in the current name scope.
    /// Build errors (wrong dtypes or shapes) are recorded and the node gets no outputs.
    pub fn add_node(&self, op: &'static OpDef, name: &str, inputs: &[Output], attrs: Attrs) -> NodeId {
        let full = {
            let inner = self.inner.borrow();
            format!("{}{}", inner.scopes.name_scope, if name.is_empty() { op.name } else { name })
        };
        self.add_node_named(op, &full, inputs, attrs, true)
    }

    /// Adds a node with exactly `name` (no scope prefix); a taken name is an error unless
    /// `uniquify` is set.
    pub fn add_node_named(
        &self,
        op: &'static OpDef,
        name: &str,
        inputs: &[Output],
        mut attrs: Attrs,
        uniquify: bool,
    ) -> NodeId {
        let mut inner = self.inner.borrow_mut();
        let name = if uniquify || !inner.names.contains_key(name) {
            unique_name(&mut inner, name)
        } else {
            let e = Error::invalid_argument(format!("a node named '{name}' already exists"));
            inner.error.get_or_insert(e);
            unique_name(&mut inner, name)
        };
        let mut in_infos = Vec::with_capacity(inputs.len());
        let mut consts = Vec::with_capacity(inputs.len());
        let mut err = None;
        for (i, inp) in inputs.iter().enumerate() {
            match inner
                .nodes
                .get(inp.node.0 as usize)
                .and_then(|n| n.outputs.get(inp.index as usize).map(|o| (o.clone(), n)))
            {
                Some((info, src)) => {
                    consts.push(if src.op == "Const" {
                        src.attrs.tensor("value").ok().cloned()
                    } else {
                        None
                    });
                    in_infos.push(info);
                }
                None => {
                    err.get_or_insert_with(|| {
                        Error::invalid_argument(format!(
                            "node '{name}' ({}): input {i} comes from a node that failed to build",
                            op.name
                        ))
                    });
                    in_infos.push(TensorInfo::new(DType::F32, PartialShape::unknown()));
                    consts.push(None);
                }
            }
        }
        if op.stateful && !attrs.contains_key("container") {
            if let Some(c) = &inner.scopes.container {
                attrs.insert("container".into(), AttrValue::Str(c.clone()));
            }
        }
        let mut colocate: Vec<String> = Vec::new();
        if let Some(c) = inner.scopes.colocate {
            colocate.push(format!("loc:@{}", inner.nodes[c.0 as usize].name));
        }
        if !colocate.is_empty() {
            attrs.insert(COLOCATION_ATTR.into(), AttrValue::Strs(colocate));
        }
        let outputs = match err {
            Some(e) => {
                inner.error.get_or_insert(e);
                Vec::new()
            }
            None => {
                let ctx =
                    InferCtx { node: &name, op: op.name, inputs: &in_infos, attrs: &attrs, consts: &consts };
                match (op.infer)(&ctx) {
                    Ok(o) => o,
                    Err(e) => {
                        let e = Error::new(e.code, format!("node '{name}' ({}): {}", op.name, e.msg));
                        inner.error.get_or_insert(e);
                        Vec::new()
                    }
                }
            }
        };
        let mut node = NodeDef {
            name: name.clone(),
            op: op.name.to_string(),
            inputs: inputs.to_vec(),
            control_inputs: inner.scopes.control.clone(),
            device: String::new(),
            attrs,
            outputs,
        };
        // Device: the colocation target's request wins; else the scope stack, outermost first.
        node.device = match inner.scopes.colocate {
            Some(c) => inner.nodes[c.0 as usize].device.clone(),
            None => {
                let mut dev = DeviceName::default();
                for s in &inner.scopes.devices {
                    dev = match s {
                        DeviceScope::Name(d) => dev.override_with(d),
                        DeviceScope::Func(f) => {
                            node.device = dev.to_string();
                            f(&node)
                        }
                    };
                }
                dev.to_string()
            }
        };
        let id = NodeId(inner.nodes.len() as u32);
        inner.names.insert(name, id);
        inner.nodes.push(node);
        id
    }

    /// Adds a node and returns its first output.
    pub fn op(&self, op: &'static OpDef, name: &str, inputs: &[Output], attrs: Attrs) -> Output {
        Output::new(self.add_node(op, name, inputs, attrs), 0)
    }

    /// Number of outputs a node has (0 when it failed to build).
    pub fn num_outputs(&self, id: NodeId) -> usize {
        self.inner.borrow().nodes[id.0 as usize].outputs.len()
    }

    pub(crate) fn register_variable(&self, info: VariableInfo) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        if inner.var_by_name.contains_key(&info.name) {
            return Err(Error::already_exists(format!("variable '{}' already exists", info.name)));
        }
        let i = inner.variables.len();
        inner.var_by_name.insert(info.name.clone(), i);
        inner.variables.push(info);
        Ok(())
    }

    pub fn variable_info(&self, name: &str) -> Option<VariableInfo> {
        let inner = self.inner.borrow();
        inner.var_by_name.get(name).map(|&i| inner.variables[i].clone())
    }

    /// The variable info for the variable node behind `var`.
    pub fn variable_of(&self, var: Output) -> Option<VariableInfo> {
        self.inner.borrow().variables.iter().find(|v| v.var.node == var.node).cloned()
    }

    pub(crate) fn var_scope_state(&self) -> (String, Reuse) {
        let inner = self.inner.borrow();
        (inner.scopes.var_scope.clone(), inner.scopes.reuse.last().copied().unwrap_or(Reuse::No))
    }

    /// Replaces the name-scope prefix, returning the previous one.
    pub(crate) fn set_name_scope(&self, scope: &str) -> String {
        std::mem::replace(&mut self.inner.borrow_mut().scopes.name_scope, scope.to_string())
    }

    pub(crate) fn with_node_mut(&self, id: NodeId, f: impl FnOnce(&mut NodeDef)) {
        if let Some(n) = self.inner.borrow_mut().nodes.get_mut(id.0 as usize) {
            f(n)
        }
    }

    /// Records a build error raised by a builder helper outside `add_node`.
    pub fn fail(&self, e: Error) {
        self.record_error(e)
    }
}

fn unique_name(inner: &mut Inner, base: &str) -> String {
    if !inner.names.contains_key(base) && !inner.name_counts.contains_key(base) {
        inner.name_counts.insert(base.to_string(), 0);
        return base.to_string();
    }
    loop {
        let c = inner.name_counts.entry(base.to_string()).or_insert(0);
        *c += 1;
        let cand = format!("{base}_{c}");
        if !inner.names.contains_key(&cand) && !inner.name_counts.contains_key(&cand) {
            inner.name_counts.insert(cand.clone(), 0);
            return cand;
        }
    }
}
