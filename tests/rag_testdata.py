"""Documents made in the tests of scratchlm.rag: PDFs written byte by byte, a small corpus."""

from __future__ import annotations

import io
from pathlib import Path


def _pdf_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one page per list, each string one line of Helvetica text."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = {1: "<< /Type /Catalog /Pages 2 0 R >>",
               2: f"<< /Type /Pages /Kids [{kids}] /Count {n} >>",
               3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    for i, lines in enumerate(pages):
        body = " ".join(f"({_pdf_string(line)}) Tj T*" for line in lines)
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {body} ET"
        objects[4 + 2 * i] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                              f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objects[5 + 2 * i] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref, size = len(out), max(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[k]:010d} 00000 n \n".encode() for k in range(1, size))
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str, owner_password: str = "owner") -> bytes:
    """``data`` encrypted with pypdf (RC4, which needs no extra package)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password=owner_password, algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


# Five documents on distinct topics, for "the right document comes first" tests.
CORPUS = {
    "volcanoes.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet where hot lava, "
                    "volcanic ash and gases escape from a magma chamber below the surface. Eruptions "
                    "can bury towns under ash.\n",
    "bread.txt": "Baking bread\n============\n\nKnead flour, water, salt and yeast into a dough, let it "
                 "rise for two hours, then bake it in a hot oven until the crust is golden brown.\n",
    "chess.html": "<html><head><title>Chess</title></head><body><h1>Chess rules</h1><p>In chess the "
                  "king moves one square in any direction. Castling moves the king two squares towards "
                  "a rook.</p></body></html>",
    "tides.txt": "Tides\n=====\n\nOcean tides rise and fall twice a day because the gravity of the Moon "
                 "and the Sun pulls on the water of the oceans.\n",
    "guitar.md": "## Tuning a guitar\n\nStandard guitar tuning from the lowest string is E A D G B E; "
                 "tighten a string's peg to raise its pitch.\n",
}
QUESTIONS = {
    "What comes out of a volcano when it erupts?": "volcanoes.md",
    "How long should dough rise before baking?": "bread.txt",
    "How does the king move in chess?": "chess.html",
    "Why does the sea level change during the day?": "tides.txt",
    "What are the notes of standard guitar tuning?": "guitar.md",
}


def write_corpus(folder: Path, docs: dict[str, str] = CORPUS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder
