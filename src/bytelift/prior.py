"""The source prior: a subword model's next-token distribution as a distribution over the next byte.

A byteified model's global model is its source transformer, so at every patch end it still knows the
source's next-token distribution p(token | patches so far) — through the source's own LM head. Spelled
byte by byte, that distribution gives, for the bytes q already emitted in the current patch and every
next symbol c (a byte or a special id, in the byte-side id space):

    P(c, patch continues | q) = S⁺(q·c) / S⁺(q)      P(c, patch ends | q) = E(q·c) / S⁺(q)

with S⁺(x) the mass of the tokens whose spelling strictly extends x and E(x) the mass of the tokens spelled
exactly x. These 2·V_b numbers sum to 1 (every token strictly extending q is q·c, or extends q·c, for
exactly one c) and are the fused output layout of the byte model (id c + V_b = "c, and it ends a patch").
Along a token's bytes the product of the factors is exactly p(token) (the prefix masses telescope).

`TokenTrie` holds the vocabulary sorted by spelling: every trie node (a prefix of some spelling) is then
a contiguous range [lo, hi) of the sorted order whose first `exact` entries spell the prefix itself, so
each mass above is a difference of one cumulative sum over the sorted token probabilities (float64: the
masses of long tokens are tiny next to the cumulative sum). Nothing here loops over bytes in Python: the
prefix nodes of whole batches are found one patch offset at a time, the children of many positions are
gathered at once.

Spellings are the data pipeline's (`ByteTokenizer.source_bytes_and_patches`): ordinary tokens as their
bytes, the source's bos/eos/pad as one byte-side special id, other special tokens as their text; ids
without a spelling (padding rows of the embedding, unmappable pieces) carry no mass here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bytelift.tokenization import BYTE_VOCAB_SIZE

__all__ = ["NO_NODE", "ROOT", "TokenTrie", "add_prior", "prior_logprobs", "token_cumsums"]

# Node id of "no prefix of any spelling" (the prior has nothing to say there).
NO_NODE = -1
# The root node: the empty prefix, at the start of every patch.
ROOT = 0


class TokenTrie:
    """The source vocabulary's spellings as a forward trie over byte-side ids, in sorted order.

    Args:
        spellings: per source id, its spelling as byte-side ids (a sequence of ints in [0, V_b)), or None /
            empty for ids without a spelling.
        num_rows: rows of the source's LM head (>= len(spellings); extra rows have no spelling). Logits of
            any width that covers the spelled ids are accepted (the teacher's may be padded differently).

    Attributes (numpy; `tensors(device)` gives torch copies):
        order: (T,) source ids with a spelling, sorted by spelling (a prefix before its extensions).
        lo, hi, exact: (N,) per node, the range [lo, hi) of `order` whose spellings start with the node's
            prefix, and how many of them (at the range start) spell it exactly.
        first_child, num_children: (N,) children of node n are nodes first_child[n] .. + num_children[n],
            in the order of their symbol; symbol: (N,) the last symbol of each node's prefix (root: -1).
        edge_keys: (N-1,) parent·V_b + symbol of nodes 1..N-1, ascending (child lookup by binary search).
        depth: the longest spelling.
    """

    def __init__(self, spellings: Sequence[Sequence[int] | None], num_rows: int | None = None):
        V = BYTE_VOCAB_SIZE
        self.num_rows = len(spellings) if num_rows is None else int(num_rows)
        if self.num_rows < len(spellings):
            raise ValueError(f"num_rows={self.num_rows} is smaller than the {len(spellings)} spelled ids")
        ids, keys = [], []
        for i, s in enumerate(spellings):
            if s is None or len(s) == 0:
                continue
            arr = np.asarray(s, dtype=np.int64)
            if arr.min() < 0 or arr.max() >= V:
                raise ValueError(f"spelling of id {i} has symbols outside [0, {V})")
            ids.append(i)
            keys.append(arr.astype(">u2").tobytes())  # big-endian: byte order = symbol order, prefixes first
        if not ids:
            raise ValueError("no token of the vocabulary has a spelling")
        perm = sorted(range(len(ids)), key=keys.__getitem__)
        self.order = np.asarray(ids, dtype=np.int64)[perm]
        lengths = np.array([len(keys[p]) // 2 for p in perm], dtype=np.int64)
        T, D = len(perm), int(lengths.max())
        self.depth = D
        table = np.full((T, D), -1, dtype=np.int64)
        for row, p in enumerate(perm):  # once per token, at construction
            table[row, : lengths[row]] = np.frombuffer(keys[p], dtype=">u2")

        # Nodes depth by depth: at depth d, runs of consecutive sorted tokens sharing their first d symbols.
        lo, hi, exact, symbol, parent = [np.array([0])], [np.array([T])], [np.array([0])], [np.array([-1])], [
            np.array([-1])]
        same = np.ones(T, dtype=bool)  # token i shares its first d symbols with token i-1
        same[0] = False
        node_of = np.zeros(T, dtype=np.int64)  # each token's node at the previous depth
        count = 1
        for d in range(1, D + 1):
            alive = lengths >= d
            col = table[:, d - 1]
            same = same & np.concatenate([[False], col[1:] == col[:-1]]) & alive & np.concatenate([[False], alive[:-1]])
            starts = np.flatnonzero(alive & ~same)
            # alive tokens form runs; a run ends where the next token is not `same`
            run_id = np.cumsum(alive & ~same) - 1  # valid where alive
            ends = np.zeros(len(starts), dtype=np.int64)
            idx = np.flatnonzero(alive)
            np.maximum.at(ends, run_id[idx], idx + 1)
            ex = np.zeros(len(starts), dtype=np.int64)
            np.add.at(ex, run_id[idx], (lengths[idx] == d).astype(np.int64))
            lo.append(starts)
            hi.append(ends)
            exact.append(ex)
            symbol.append(col[starts])
            parent.append(node_of[starts])
            new_ids = count + np.arange(len(starts))
            node_of[idx] = new_ids[run_id[idx]]
            count += len(starts)
        self.lo, self.hi, self.exact = (np.concatenate(x) for x in (lo, hi, exact))
        self.symbol, parent_arr = np.concatenate(symbol), np.concatenate(parent)
        N = count
        self.num_nodes = N
        # Children of one parent are consecutive node ids (depth by depth, in sorted order).
        self.num_children = np.bincount(parent_arr[1:], minlength=N).astype(np.int64)
        self.first_child = np.full(N, N, dtype=np.int64)  # leaves keep N (never read: no children)
        np.minimum.at(self.first_child, parent_arr[1:], np.arange(1, N))
        self.edge_keys = parent_arr[1:] * V + self.symbol[1:]
        if np.any(np.diff(self.edge_keys) <= 0):  # pragma: no cover - a construction invariant
            raise AssertionError("trie edge keys are not strictly ascending")
        self._tensors: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_byte_tokenizer(cls, tokenizer, num_rows: int | None = None) -> TokenTrie:
        """The trie of a `ByteTokenizer`'s source vocabulary, spelled as its data pipeline spells tokens."""
        table = getattr(tokenizer, "_source_bytes", None)
        if table is None:
            raise ValueError("the source prior needs a ByteTokenizer wrapping the source tokenizer")
        spellings = [table.flat[o : o + n] for o, n in zip(table.offsets.tolist(), table.lengths.tolist())]
        return cls(spellings, num_rows=num_rows)

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The arrays as torch tensors on `device` (cached)."""
        device = torch.device(device)
        if device not in self._tensors:
            names = ("order", "lo", "hi", "exact", "first_child", "num_children", "symbol", "edge_keys")
            self._tensors[device] = {n: torch.as_tensor(getattr(self, n), device=device) for n in names}
        return self._tensors[device]

    # --- walking --------------------------------------------------------------------------------------

    def child(self, node: torch.Tensor, symbol: torch.Tensor) -> torch.Tensor:
        """Child of each node by the given symbol (NO_NODE where the node or the edge does not exist)."""
        t = self.tensors(node.device)
        keys = t["edge_keys"]
        key = node.clamp_min(0) * BYTE_VOCAB_SIZE + symbol
        j = torch.searchsorted(keys, key).clamp_max(keys.numel() - 1)
        found = (keys[j] == key) & (node >= 0) & (symbol >= 0) & (symbol < BYTE_VOCAB_SIZE)
        return torch.where(found, j + 1, torch.full_like(j, NO_NODE))

    def advance(self, node: torch.Tensor, symbol: torch.Tensor, ends_patch: torch.Tensor) -> torch.Tensor:
        """Decoding cursor: after emitting `symbol` (A,), the node of the current patch's prefix: the root
        when the symbol closed its patch, else the child (NO_NODE once off the trie)."""
        return torch.where(ends_patch, torch.full_like(node, ROOT), self.child(node, symbol))

    def prefix_nodes(self, input_ids: torch.Tensor, boundary_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Node of the prefix q(t) emitted in the current patch after each byte t.

        q(t) = the bytes after the last boundary at or before t, up to t (empty, the root, when byte t ends
        its patch). Positions before a row's first boundary, padding, and prefixes that no spelling has are
        NO_NODE. One vectorised step per patch offset, at most the trie's depth.

        Args:
            input_ids: (B, L) byte-side ids; boundary_mask: (B, L) bool, byte t ends a patch; mask: (B, L) valid.
        Returns:
            (B, L) long node ids.
        """
        B, L = input_ids.shape
        boundary = boundary_mask & mask
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        last = torch.where(boundary, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # last boundary ≤ t
        offset = torch.where(last >= 0, pos - last, torch.full_like(pos, -1))
        nodes = torch.where(offset == 0, torch.full_like(pos, ROOT), torch.full_like(pos, NO_NODE))
        for k in range(1, min(int(offset.max()) if offset.numel() else 0, self.depth) + 1):
            b, t = (offset == k).nonzero(as_tuple=True)
            if b.numel() == 0:
                break
            nodes[b, t] = self.child(nodes[b, t - 1], input_ids[b, t])
        return torch.where(mask, nodes, torch.full_like(nodes, NO_NODE))

    def close_boundaries(
        self, input_ids: torch.Tensor, boundary_mask: torch.Tensor, mask: torch.Tensor, max_rounds: int,
        back_to_token: bool = False,
    ) -> torch.Tensor:
        """Add the boundaries the vocabulary forces: byte t ends its patch when the patch's bytes up to t,
        followed by byte t+1, are a prefix of no source token (a token containing them does not exist, so
        the source's tokenization ends a token at t). Uses one byte of lookahead (the predictor reads at
        least that far).

        With `back_to_token` the forced boundary goes instead to the last byte of the patch (up to t) where the
        patch so far is a whole token, when there is one: the patch then is a token, which the prior can end
        (a patch that is only a token prefix has end probability 0 under it).

        A new boundary restarts the next patch at the root, which can expose a later violation, so the rule
        is applied in rounds (`max_rounds` at most; each round fixes the first violation of every patch).

        Args:
            input_ids, boundary_mask, mask: (B, L); the last valid byte of a row has no lookahead and is left as is.
        Returns:
            (B, L) bool boundaries, a superset of `boundary_mask & mask`.
        """
        boundary = boundary_mask & mask
        lookahead = F.pad(mask[:, 1:], (0, 1), value=False) & mask
        nxt = F.pad(input_ids[:, 1:], (0, 1), value=0)
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        exact = self.tensors(input_ids.device)["exact"]
        for _ in range(max_rounds):
            nodes = self.prefix_nodes(input_ids, boundary, mask)
            forced = lookahead & (nodes != NO_NODE) & ~boundary & (self.child(nodes, nxt) == NO_NODE)
            if not bool(forced.any()):
                break
            if back_to_token:
                # The last position of the patch (up to the violation) whose prefix is a whole token.
                whole = (nodes != NO_NODE) & (exact[nodes.clamp_min(0)] > 0)
                last_whole = torch.where(whole, pos, torch.full_like(pos, -1)).cummax(dim=1).values
                start = torch.where(boundary, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # < t here
                target = torch.where(last_whole > start, last_whole, pos)
                b, t = forced.nonzero(as_tuple=True)
                boundary = boundary.clone()
                boundary[b, target[b, t]] = True
            else:
                boundary = boundary | forced
        return boundary


def token_cumsums(trie: TokenTrie, token_logits: torch.Tensor) -> torch.Tensor:
    """Cumulative token probabilities in the trie's sorted order.

    Args:
        token_logits: (..., num_rows) the source LM head's logits (as the source processes them).
    Returns:
        (..., T + 1) float64: C[..., i] = total probability of the first i sorted spelled tokens (C[..., 0] = 0).
        Differentiable (stage 2 trains the global model through the prior).
    """
    if token_logits.shape[-1] <= int(trie.order.max()):
        raise ValueError(
            f"token logits have {token_logits.shape[-1]} entries, but the vocabulary spells id {int(trie.order.max())}"
        )
    probs = torch.softmax(token_logits.float(), dim=-1)
    order = trie.tensors(token_logits.device)["order"]
    sorted_probs = probs.index_select(-1, order).double()
    return torch.nn.functional.pad(sorted_probs.cumsum(dim=-1), (1, 0))


def prior_logprobs(
    trie: TokenTrie, cumsums: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The source prior's log-probabilities over the 2·V_b fused outputs at a set of positions.

    Args:
        cumsums: (R, T + 1) float64 from `token_cumsums`, one row per global position (patch).
        rows: (G,) the cumsum row of each position (the patch whose global output it reads).
        nodes: (G,) prefix node of each position (NO_NODE: no prior).
        floor: mixing weight of the uniform distribution over the 2·V_b outputs: log((1 − floor)·P + floor/2V_b),
            so that symbols the vocabulary cannot spell from q keep a finite (small) probability.
    Returns:
        (log_prior (G, 2·V_b) float64, 0 where there is no prior; has_prior (G,) bool: the node exists and some
        token strictly extends it).
    """
    V = BYTE_VOCAB_SIZE
    G, width = nodes.shape[0], cumsums.shape[1]
    t = trie.tensors(cumsums.device)
    node = nodes.clamp_min(0)
    flat = cumsums.reshape(-1)
    row_base = rows * width

    def mass(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (flat[base + b] - flat[base + a]).clamp_min(0.0)

    lo, hi, ex = t["lo"][node], t["hi"][node], t["exact"][node]
    extending = mass(row_base, lo + ex, hi)  # S⁺(q)
    has_prior = (nodes >= 0) & (t["num_children"][node] > 0)
    counts = torch.where(has_prior, t["num_children"][node], torch.zeros_like(node))
    # All children of all positions at once: position index and child node id of each.
    pos = torch.repeat_interleave(torch.arange(G, device=cumsums.device), counts)
    start = torch.repeat_interleave(t["first_child"][node] - torch.cumsum(counts, 0) + counts, counts)
    child = start + torch.arange(pos.numel(), device=cumsums.device)
    c_lo, c_hi, c_ex = t["lo"][child], t["hi"][child], t["exact"][child]
    base = row_base[pos]
    denom = extending[pos].clamp_min(torch.finfo(torch.float64).tiny)
    cont = mass(base, c_lo + c_ex, c_hi) / denom
    end = mass(base, c_lo, c_lo + c_ex) / denom
    sym = t["symbol"][child]
    probs = cumsums.new_zeros(G, 2 * V)
    probs = probs.index_put((pos, sym), cont).index_put((pos, sym + V), end)
    has_prior = has_prior & (extending > 0)
    log_prior = torch.log((1.0 - floor) * probs + floor / (2 * V))
    return torch.where(has_prior[:, None], log_prior, torch.zeros_like(log_prior)), has_prior


def add_prior(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Decoder logits plus the prior, in the logits' precision but at least float32 (bf16 logits would
    round the prior's small differences away)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype) + log_prior.to(dtype)
