#!/usr/bin/env bash
# Large files for the GPU machine, in parts small enough to carry one per device call (64 MiB per call in all).
#   bash scripts/device_parts.sh split FILE [MIB]   # here: .carry/parts/NAME.part-00 .. and NAME.sha256
#   bash scripts/device_parts.sh gather [DEST]      # there: copy carried parts into DEST (default ~/parts),
#                                                   # assemble DEST/NAME once all parts are in and the hash matches
# Each split writes NAME.sha256 (the whole file's hash and its part count); the .sha256 file is small, so carry
# it with every part. `gather` is idempotent: it reports each NAME as assembled, complete or missing parts, and
# a part already copied is kept, so consecutive calls (the machine stays warm between them) fill DEST up.
set -euo pipefail
here=.carry/parts

split_file() {
  local file=${1:?split FILE [MIB]} mib=${2:-33}
  [ -f "$file" ] || { echo "no such file: $file" >&2; exit 2; }
  [ "$mib" -lt 34 ] || { echo "parts must stay under 34 MiB (asked $mib)" >&2; exit 2; }
  local name
  name=$(basename "$file")
  mkdir -p "$here"
  rm -f "$here/$name".part-* "$here/$name.sha256"
  split -b "${mib}M" -d -a 2 "$file" "$here/$name.part-"
  local n
  n=$(ls "$here/$name".part-* | wc -l)
  echo "$(sha256sum < "$file" | cut -d' ' -f1) $n" > "$here/$name.sha256"
  ls -l "$here/$name".part-* "$here/$name.sha256" | awk '{print $5, $9}'
}

gather() {
  local dest=${1:-$HOME/parts}
  mkdir -p "$dest"
  if [ -d "$here" ]; then
    cp -n "$here"/* "$dest"/ 2>/dev/null || true  # -n: a part carried twice is not rewritten
  fi
  local sum name hash n have missing
  for sum in "$dest"/*.sha256; do
    [ -e "$sum" ] || { echo "parts: none in $dest"; return 0; }
    name=$(basename "$sum" .sha256)
    read -r hash n < "$sum"
    if [ -f "$dest/$name" ] && [ "$(sha256sum < "$dest/$name" | cut -d' ' -f1)" = "$hash" ]; then
      rm -f "$dest/$name".part-*  # parts carried again after the assembly
      echo "parts: $name assembled ($dest/$name)"
      continue
    fi
    have=() missing=()
    for i in $(seq -f %02g 0 $((n - 1))); do
      if [ -f "$dest/$name.part-$i" ]; then have+=("$i"); else missing+=("$i"); fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "parts: $name has parts ${have[*]:-none} of $n; missing ${missing[*]}"
      continue
    fi
    cat "$dest/$name".part-* > "$dest/.$name.tmp"
    if [ "$(sha256sum < "$dest/.$name.tmp" | cut -d' ' -f1)" != "$hash" ]; then
      rm -f "$dest/.$name.tmp" "$dest/$name".part-*  # dropped, so that parts carried again are copied in
      echo "!! parts: $name: all $n parts present but the hash differs from $hash; carry them again" >&2
      return 3
    fi
    mv "$dest/.$name.tmp" "$dest/$name"
    rm -f "$dest/$name".part-*  # the whole file is kept instead; its hash stays checkable via NAME.sha256
    echo "parts: $name assembled from $n parts ($dest/$name)"
  done
}

case "${1:-}" in
  split) shift; split_file "$@" ;;
  gather) shift; gather "$@" ;;
  *) echo "usage: device_parts.sh split FILE [MIB] | gather [DEST]" >&2; exit 2 ;;
esac
