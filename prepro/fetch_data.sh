#!/usr/bin/env bash
# fetch_data.sh NAME DEST: puts a public data file into the folder DEST.
# It is taken from $MEGATRON_DATA (default: ../shared/data next to the repository) when
# there, else downloaded with curl; files with a known sha256 are checked. A file
# already in DEST is kept. Prints the path of each file it provides.
#   tinyshakespeare  input.txt                      (karpathy/char-rnn)
#   gpt2             encoder.json, vocab.bpe        (OpenAI GPT-2 BPE)
#   bert-uncased     vocab-uncased.txt              (bert-large-uncased)
#   bert-cased       vocab-cased.txt                (bert-large-cased)
#   lambada          lambada_test.jsonl             (OpenAI's LAMBADA test set)
#   wikitext-103     wikitext-103-v1.zip, unpacked to wikitext-103/wiki.{train,valid,test}.tokens (WIKITEXT103's test set)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${MEGATRON_DATA:-$ROOT/../shared/data}"

die() { echo "error: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: fetch_data.sh NAME DEST (NAME: tinyshakespeare gpt2 bert-uncased bert-cased lambada wikitext-103)"
NAME="$1"
DEST="$2"

# fetch FILE LOCAL_PATH URL SHA256: DEST/FILE from $DATA/LOCAL_PATH or URL
fetch() {
    local file="$1" local_path="$2" url="$3" sha="$4" out="$DEST/$1"
    if [ ! -s "$out" ]; then
        if [ -n "$local_path" ] && [ -s "$DATA/$local_path" ]; then
            cat "$DATA/$local_path" > "$out.part"
            echo "$NAME: $file from $DATA/$local_path" >&2
        else
            command -v curl > /dev/null || die "$NAME: $file is not in $DATA and curl is not installed to download $url"
            echo "$NAME: downloading $url" >&2
            curl -fL --retry 2 --connect-timeout 20 -sS -o "$out.part" "$url" ||
                { rm -f "$out.part"; die "$NAME: cannot download $url (no network?); put $file into $DEST or set MEGATRON_DATA"; }
        fi
        mv "$out.part" "$out"
    fi
    if [ -n "$sha" ] && command -v sha256sum > /dev/null; then
        local got
        got="$(sha256sum "$out" | cut -d' ' -f1)"
        [ "$got" = "$sha" ] || die "$NAME: $out has sha256 $got, expected $sha (remove it to fetch it again)"
    fi
    echo "$out"
}

mkdir -p "$DEST" || die "cannot create folder $DEST"
case "$NAME" in
    tinyshakespeare)
        fetch input.txt tinyshakespeare/input.txt \
            https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt \
            86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed ;;
    gpt2)
        fetch encoder.json gpt2/encoder.json https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json \
            196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
        fetch vocab.bpe gpt2/vocab.bpe https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe \
            1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5 ;;
    bert-uncased)
        fetch vocab-uncased.txt bert/vocab-uncased.txt https://s3.amazonaws.com/models.huggingface.co/bert/bert-large-uncased-vocab.txt \
            07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3 ;;
    bert-cased)
        fetch vocab-cased.txt bert/vocab-cased.txt https://s3.amazonaws.com/models.huggingface.co/bert/bert-large-cased-vocab.txt \
            eeaa9875b23b04b4c54ef759d03db9d1ba1554838f8fb26c5d96fa551df93d02 ;;
    lambada)
        fetch lambada_test.jsonl lambada/lambada_test.jsonl https://github.com/cybertronai/bflm/raw/master/lambada_test.jsonl \
            4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226 ;;
    wikitext-103)
        # the original https://s3.amazonaws.com/research.metamind.io/wikitext/ copy is gone (403);
        # this is the mirror of WikiText's author that the datasets library and pytorch/examples use
        zip="$(fetch wikitext-103-v1.zip wikitext/wikitext-103-v1.zip https://wikitext.smerity.com/wikitext-103-v1.zip "")"
        if [ ! -s "$DEST/wikitext-103/wiki.test.tokens" ]; then
            python3 -m zipfile -e "$zip" "$DEST" || die "wikitext-103: cannot unpack $zip"
        fi
        echo "$DEST/wikitext-103" ;;
    *) die "unknown data set '$NAME' (known: tinyshakespeare gpt2 bert-uncased bert-cased lambada wikitext-103)" ;;
esac
