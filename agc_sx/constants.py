"""Physics constants of the AGC v2 ttbar analysis, kept in one place.

Every cut value, cross section and binning used anywhere in agc-sx comes from here, so that the skim query,
the processor, the BDT and the fit cannot drift apart.
"""

from __future__ import annotations

from typing import Final

#: Integrated luminosity of the 2015 CMS Open Data used by the AGC, in /pb.
LUMI_PB: Final = 3378.0

#: Cross sections (pb) applied when a catalogue entry has no ``xsec`` (the AGC ``cross_section`` table).
XSEC_PB: Final[dict[str, float]] = {
    "ttbar": 396.87 + 332.97,  # 729.84, semileptonic + fully hadronic; same for every ttbar variation
    "single_top_s_chan": 2.0268 + 1.2676,  # 3.2944
    "single_top_t_chan": (36.993 + 22.175) / 0.252,  # 234.7937, divided by BR(W -> l nu)
    "single_top_tW": 37.936 + 37.906,  # 75.842
    "wjets": 61457 * 0.252,  # 15487.164
}

#: Processes in stacking order (largest first for plots); every key of XSEC_PB.
PROCESSES: Final = ("ttbar", "wjets", "single_top_s_chan", "single_top_t_chan", "single_top_tW")

#: The alternative ttbar samples that are filled as a variation of their own.
TTBAR_ALTERNATIVES: Final = ("scaledown", "scaleup", "ME_var", "PS_var")

# --- object selection (AGC v2) -------------------------------------------------------------------------------
LEPTON_PT_MIN: Final = 30.0
LEPTON_ABS_ETA_MAX: Final = 2.1
ELECTRON_CUTBASED: Final = 4  # tight
LEPTON_SIP3D_MAX: Final = 4.0
MUON_ISO_MAX: Final = 0.15  # pfRelIso04_all
JET_PT_MIN: Final = 30.0
JET_ABS_ETA_MAX: Final = 2.4
JET_ID_MASK: Final = 4  # tight-lepton-veto: bit 2 of jetId
BTAG_WP: Final = 0.5  # btagCSVV2 > 0.5, strictly
#: The skim keeps jets down to this pT so that the +3 % JES variation (30 / 1.03 = 29.1 GeV) finds its events.
SKIM_JET_PT_MIN: Final = 25.0
MIN_JETS: Final = 4

# --- systematics ----------------------------------------------------------------------------------------------
JES_UP_FACTOR: Final = 1.03
JER_SIGMA: Final = 0.05
BTAG_VAR_SLOPE: Final = 0.075  # weight 1 +- 0.075 * pT / 50
BTAG_VAR_PT_REF: Final = 50.0
N_BTAG_VARIATIONS: Final = 4
WJETS_SCALE_UP: Final = 1.025
WJETS_SCALE_DOWN: Final = 0.975
LUMI_UNCERTAINTY: Final = 0.03

# --- histograms -----------------------------------------------------------------------------------------------
REGIONS: Final = ("4j1b", "4j2b")
OBSERVABLES: Final[dict[str, str]] = {"4j1b": "HT", "4j2b": "m_bjj"}
HIST_BINS: Final = 25
HIST_RANGE: Final = (50.0, 550.0)
#: The fit rebins to 11 bins of 40 GeV from 110 to 550 GeV (AGC: ``h[110j::hist.rebin(2)]``).
FIT_RANGE: Final = (110.0, 550.0)
FIT_REBIN: Final = 2

#: Weight-only variations filled for every nominal sample (wjets additionally gets ``scale_var_{up,down}``).
BTAG_VARIATIONS: Final = tuple(
    f"btag_var_{i}_{d}" for i in range(N_BTAG_VARIATIONS) for d in ("up", "down")
)
JET_VARIATIONS: Final = ("nominal", "pt_scale_up", "pt_res_up")
WJETS_SCALE_VARIATIONS: Final = ("scale_var_up", "scale_var_down")

# --- particle properties (PDG; the event generator and the top reconstruction use them) -----------------------
TOP_MASS: Final = 172.5  # GeV
TOP_WIDTH: Final = 1.41
W_MASS: Final = 80.4
W_WIDTH: Final = 2.085

# --- BDT jet-parton assignment ---------------------------------------------------------------------------------
#: The 20 features (name, histogram bins, low, high) in the order the models take them; ML histograms are
#: written as ``{name}_{process}[_{variation}]``.
ML_FEATURES: Final[tuple[tuple[str, int, float, float], ...]] = (
    ("deltar_leptonbtoplep", 25, 0.0, 6.0),
    ("deltar_w1w2", 25, 0.0, 6.0),
    ("deltar_w1btophad", 25, 0.0, 6.0),
    ("deltar_w2btophad", 25, 0.0, 6.0),
    ("mass_leptonbtoplep", 25, 50.0, 300.0),
    ("mass_w1w2", 25, 50.0, 300.0),
    ("mass_w1w2btophad", 25, 50.0, 550.0),
    ("pt_w1w2btophad", 25, 50.0, 550.0),
    ("pt_w1", 25, 25.0, 300.0),
    ("pt_w2", 25, 25.0, 300.0),
    ("pt_btophad", 25, 25.0, 300.0),
    ("pt_btoplep", 25, 25.0, 300.0),
    ("btag_w1", 25, 0.0, 1.0),
    ("btag_w2", 25, 0.0, 1.0),
    ("btag_btophad", 25, 0.0, 1.0),
    ("btag_btoplep", 25, 0.0, 1.0),
    ("qgl_w1", 25, -1.0, 1.0),
    ("qgl_w2", 25, -1.0, 1.0),
    ("qgl_btophad", 25, -1.0, 1.0),
    ("qgl_btoplep", 25, -1.0, 1.0),
)
