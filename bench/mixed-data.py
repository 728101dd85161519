#!/usr/bin/env python3
"""bench/mixed-data.py PATH SIZE: write SIZE bytes (a multiple of 1 MiB) of
mixed compressible data to PATH, the same bytes every time.

Per 1 MiB block, drawn from a seeded generator: ~80% text made of a random
vocabulary (zlib with a 4 KiB window, as qcow2 uses, makes it ~2.5x
smaller), ~10% random bytes (incompressible), ~10% zero bytes (written,
not holes). Text blocks are sequences of phrases drawn from a pool of
65536, so no two blocks are alike. Used by write.sh and compressed.sh.
"""
import itertools, random, sys
path, size = sys.argv[1], int(sys.argv[2])
MiB = 1 << 20
rng = random.Random(20240611)
# Words: English-like letter frequencies, lognormal lengths; word use is
# Zipf-distributed (exponent 1.1) over 8000 words.
letters = "etaoinshrdlcumwfgypbvkjxqz"
lcum = list(itertools.accumulate([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0,
    2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]))
vocab = set()
while len(vocab) < 8000:
    n = min(max(int(rng.lognormvariate(1.6, 0.45)), 1), 16)
    vocab.add("".join(rng.choices(letters, cum_weights=lcum, k=n)))
vocab = sorted(vocab)
rng.shuffle(vocab)
wcum = list(itertools.accumulate(1.0 / (i + 1) ** 1.1 for i in range(len(vocab))))
phrases = []
for _ in range(65536):
    w = rng.choices(vocab, cum_weights=wcum, k=rng.randint(3, 14))
    if rng.random() < 0.3:
        w[0] = w[0].capitalize()
    s = " ".join(w) + rng.choice([" ", " ", " ", ", ", ". ", ".\n", ";\n", ": ", "\n\n"])
    if rng.random() < 0.05:
        s += "%d " % rng.randint(0, 99999)
    phrases.append(s.encode())
k = int(MiB / (sum(map(len, phrases)) / len(phrases)) * 1.1) + 16
zero = bytes(MiB)
with open(path, "wb") as f:
    for off in range(0, size, MiB):
        x = rng.random()
        if x < 0.10:
            f.write(zero)
        elif x < 0.20:
            f.write(rng.randbytes(MiB))
        else:
            b = b"".join(rng.choices(phrases, k=k))
            while len(b) < MiB:
                b += b"".join(rng.choices(phrases, k=k))
            f.write(b[:MiB])
