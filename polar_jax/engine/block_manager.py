"""Page allocator for the paged KV cache: a free list of page ids, page 0 reserved."""

from __future__ import annotations

from polar_jax.engine.sequence import Sequence


class BlockManager:
    """Hands pages of Z = page_size token slots to sequences and takes them back.

    Page 0 is never handed out: padded batch rows point their page tables at it as scratch, so writes
    from padding never land in a live sequence's KV.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"BlockManager needs num_pages >= 2 (page 0 is reserved) and page_size >= 1: "
                             f"got {num_pages=}, {page_size=}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack, so a just-freed page (likely still in cache) is the next one handed out.
        self._free = list(range(num_pages - 1, 0, -1))
        self._owner: dict[int, object] = {}  # page id -> request_id

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    def pages_for(self, n_positions: int) -> int:
        """Pages that hold n_positions tokens."""
        return -(-n_positions // self.page_size)

    def _new_pages(self, seq: Sequence, n_tokens: int) -> int:
        return max(0, self.pages_for(seq.num_computed + n_tokens) - len(seq.pages))

    def can_allocate(self, seq: Sequence, n_tokens: int) -> bool:
        """Whether seq.pages can grow to hold num_computed + n_tokens positions."""
        return self._new_pages(seq, n_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, n_tokens: int) -> None:
        """Grow seq.pages to hold num_computed + n_tokens positions."""
        if not self.try_allocate(seq, n_tokens):
            raise RuntimeError(f"request {seq.request_id!r} needs {self._new_pages(seq, n_tokens)} pages, "
                               f"{len(self._free)} free (check can_allocate first)")

    def try_allocate(self, seq: Sequence, n_tokens: int) -> bool:
        """allocate(seq, n_tokens) if enough pages are free; whether it did (nothing changes if not)."""
        need = self._new_pages(seq, n_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            page = self._free.pop()
            self._owner[page] = seq.request_id
            seq.pages.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        """All of seq's pages back to the free list; seq.pages = []."""
        for page in reversed(seq.pages):
            if self._owner.pop(page, None) != seq.request_id:
                raise RuntimeError(f"page {page} freed by request {seq.request_id!r} that does not own it")
            self._free.append(page)
        seq.pages = []

    def check_invariants(self, seqs=None) -> None:
        """Raise AssertionError unless every page in 1..P-1 is either free or owned by exactly one sequence
        and page 0 by nobody; given `seqs` (all live sequences), also unless the pages they hold are exactly
        the owned ones, each held by its recorded owner only."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        if free & self._owner.keys():
            raise AssertionError(f"pages both free and owned: {sorted(free & self._owner.keys())}")
        if free | self._owner.keys() != set(range(1, self.num_pages)):
            raise AssertionError(f"free + owned pages != 1..{self.num_pages - 1} (page 0 handed out, or lost)")
        if seqs is None:
            return
        seen = set()
        for seq in seqs:
            for page in seq.pages:
                if page in seen or self._owner.get(page) != seq.request_id:
                    raise AssertionError(f"page {page} of request {seq.request_id!r} is not its own alone")
                seen.add(page)
        if seen != self._owner.keys():
            raise AssertionError(f"pages owned by no live sequence (leaked): {sorted(self._owner.keys() - seen)}")
