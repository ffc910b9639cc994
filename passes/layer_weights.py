"""LayerWeights: one conv or linear layer's weight over ALL models' units, in memory linear in the number of models.

Logically the weight is a matrix [rows, columns, kernel...]: one row per unit of the layer's output space (all
models), one column per feature of its input (all models). Before any merge it is block-diagonal: model m's rows
read only model m's features (and the shared network input). Stored densely it would take N^2 times one model's
weights; stored here it takes
- one dense block per model: its rows x (the shared columns, then its own columns), and
- the cross-model entries (a row of one model reading a feature of another), which only a merge creates (a shared
  unit fine-tuned, MTZ's compensated weights), kept sparse: sorted keys row * columns + column and their kernels.
  An entry is kept only while it is non-zero, so they number at most what the built network holds.

    weights = LayerWeights(row_models=[0, 0, 1], column_models=[0, 1], kernel=(), dtype=torch.float32)
    weights.set([0, 2], [0, 1], torch.ones(2, 2))   # [2, 0] and [0, 1] are cross-model entries
    weights.get([2], [0, 1])                         # tensor([[1., 1.]]); zero where nothing was ever written
"""
import torch

SHARED = -1   # the column model of a feature every model reads (the network input)


class LayerWeights:
    """get(rows, columns) -> dense [len(rows), len(columns), *kernel]; set(rows, columns, values) writes one.

    `row_models[r]` is the model of row r, `column_models[c]` the model of column c (SHARED: read by all)."""

    def __init__(self, row_models, column_models, kernel: tuple, dtype: torch.dtype, device=None):
        self.row_models = torch.as_tensor(row_models, dtype=torch.long)
        self.column_models = torch.as_tensor(column_models, dtype=torch.long)
        self.kernel = tuple(kernel)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        models = int(torch.cat([self.row_models, self.column_models, torch.tensor([-1])]).max()) + 1
        self.row_local = _rank_within(self.row_models)
        shared = self.column_models == SHARED
        self.shared_count = int(shared.sum())
        # block column of a column: shared columns first (in order), then the model's own (in order)
        self.column_local = torch.where(shared, _rank_within(self.column_models),
                                        self.shared_count + _rank_within(self.column_models))
        self.blocks = [torch.zeros((int((self.row_models == m).sum()), self.shared_count
                                    + int((self.column_models == m).sum())) + self.kernel, dtype=dtype, device=self.device)
                       for m in range(models)]
        self.cross_keys = torch.zeros(0, dtype=torch.long)
        self.cross_values = torch.zeros((0,) + self.kernel, dtype=dtype, device=self.device)

    @property
    def shape(self) -> tuple:
        return (len(self.row_models), len(self.column_models)) + self.kernel

    def zeros_like(self) -> "LayerWeights":
        """Same rows, columns and kernel, nothing written."""
        return LayerWeights(self.row_models, self.column_models, self.kernel, self.dtype, self.device)

    def numel(self) -> int:
        """Numbers stored (blocks and cross-model entries), for the memory tests."""
        return sum(block.numel() for block in self.blocks) + self.cross_values.numel()

    def get(self, rows, columns) -> torch.Tensor:
        rows, columns = _index(rows), _index(columns)
        out = torch.zeros((len(rows), len(columns)) + self.kernel, dtype=self.dtype, device=self.device)
        in_block = self._in_block(rows, columns)
        for model, picked_rows, picked_columns in self._block_parts(rows, columns):
            block = self.blocks[model][self.row_local[rows[picked_rows]]][:, self.column_local[columns[picked_columns]]]
            out[picked_rows.unsqueeze(1), picked_columns] = block
        if len(self.cross_keys):
            r, c = torch.nonzero(~in_block, as_tuple=True)
            slots, found = self._find(rows[r] * len(self.column_models) + columns[c])
            out[r[found], c[found]] = self.cross_values[slots[found]]
        return out

    def set(self, rows, columns, values: torch.Tensor) -> None:
        rows, columns = _index(rows), _index(columns)
        values = values.detach().to(device=self.device, dtype=self.dtype).reshape((len(rows), len(columns)) + self.kernel)
        in_block = self._in_block(rows, columns)
        for model, picked_rows, picked_columns in self._block_parts(rows, columns):
            local_rows = self.row_local[rows[picked_rows]].unsqueeze(1)
            self.blocks[model][local_rows, self.column_local[columns[picked_columns]]] = \
                values[picked_rows.unsqueeze(1), picked_columns]
        r, c = torch.nonzero(~in_block, as_tuple=True)
        if len(r):
            self._set_cross(rows[r] * len(self.column_models) + columns[c], values[r, c])

    # -- internals -------------------------------------------------------------------------------------------
    def _in_block(self, rows, columns) -> torch.Tensor:
        """[rows, columns] True where the entry lies in its row's model's block."""
        row_models, column_models = self.row_models[rows], self.column_models[columns]
        return (row_models[:, None] == column_models[None, :]) | (column_models == SHARED)[None, :]

    def _block_parts(self, rows, columns):
        """(model, positions in rows, positions in columns) of every block the query touches."""
        row_models, column_models = self.row_models[rows], self.column_models[columns]
        for model in torch.unique(row_models).tolist():
            picked_columns = torch.nonzero((column_models == model) | (column_models == SHARED)).flatten()
            if len(picked_columns):
                yield model, torch.nonzero(row_models == model).flatten(), picked_columns

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, found) of each key in the sorted cross-model keys."""
        slots = torch.searchsorted(self.cross_keys, keys).clamp(max=max(len(self.cross_keys) - 1, 0))
        found = self.cross_keys[slots] == keys if len(self.cross_keys) else torch.zeros_like(keys, dtype=torch.bool)
        return slots, found

    def _set_cross(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        slots, found = self._find(keys)
        self.cross_values[slots[found]] = values[found]
        nonzero = _nonzero(values)
        new = ~found & nonzero
        keys = torch.cat([self.cross_keys, keys[new]])
        stored = torch.cat([self.cross_values, values[new.to(values.device)]])
        kept = torch.cat([_nonzero(stored[:len(self.cross_keys)]),
                          torch.ones(int(new.sum()), dtype=torch.bool)])   # an entry written to zero is dropped
        order = torch.argsort(keys[kept])
        self.cross_keys = keys[kept][order]
        self.cross_values = stored[kept.to(stored.device)][order.to(stored.device)]


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """[entries] True where an entry's kernel has a non-zero, on the CPU."""
    nonzero = values.ne(0)
    return (nonzero.flatten(1).any(1) if nonzero.dim() > 1 else nonzero).cpu()


def _index(indices) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.to(device="cpu", dtype=torch.long).reshape(-1)
    return torch.tensor(list(indices), dtype=torch.long)


def _rank_within(labels: torch.Tensor) -> torch.Tensor:
    """For each position, how many earlier positions carry the same label."""
    rank = torch.zeros_like(labels)
    for label in torch.unique(labels).tolist():
        where = torch.nonzero(labels == label).flatten()
        rank[where] = torch.arange(len(where))
    return rank
