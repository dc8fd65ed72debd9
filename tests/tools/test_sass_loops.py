"""tools/sass_loops.py reads SASS text: its loops that issue wgmma, in-place half swaps, and a
revision compared through its own tree (the compile itself is test_flash_attention_aot.py's)."""

from graphir.tools.sass_loops import half_swaps, parse, wgmma_loops

# A key loop (a backward branch over two HGMMA and a swap), a tile loop around it holding more
# HGMMA than a key loop does, and straight-line code after.
SASS = """
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0110*/                   PRMT R152, R152, 0x5432, R152 ;
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88 ;
        /*0130*/                   PRMT R16, R12, 0x7632, R16 ;
        /*0140*/              @!P0 BRA 0x100 ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88 ;
        /*0160*/                   @P1 BRA 0x80 ;
        /*0170*/                   EXIT ;
"""


def test_loops_that_issue_wgmma_and_half_swaps():
    code = parse(SASS)
    assert code[4] == (0x140, "BRA 0x100")  # (the predicate dropped)
    loops = wgmma_loops(code)
    assert [(lp["at"], lp["size"], lp["hgmma"]) for lp in loops] == [
        ("0x100", 5, 2), ("0x80", 7, 3)]
    assert [(lp["at"], lp["size"]) for lp in wgmma_loops(code, most=2)] == [("0x100", 5)]
    assert dict(loops[0]["top"])["PRMT"] == 2
    # Only a register swapped into itself counts (the other PRMT is a pack of two halves).
    assert half_swaps(code) == 1
