"""The AGC v2 skim as a func_adl query over the NanoAOD tree ``Events``.

It runs where the data is (a ServiceX uproot transformer, or ``agc-sx deliver --backend local`` through the
same func-adl-uproot code path) and keeps an event only if the processor could select it in *any* of the
nominal, ``pt_scale_up`` and b-tag variations:

* exactly one tight lepton: electrons with pT > 30, |eta| < 2.1, ``cutBased == 4`` (tight), ``sip3d < 4``;
  muons with pT > 30, |eta| < 2.1, ``tightId``, ``sip3d < 4``, ``pfRelIso04_all < 0.15``. The AGC's own
  query forgot ``sip3d`` for muons and so dropped events that the analysis keeps.
* at least four jets with pT > 25 (not 30: the +3 % jet-energy scale moves 29.2 GeV jets above 30),
  |eta| < 2.4 and the tight-lepton-veto jet ID (``(jetId & 4) != 0``);
* at least one of those jets b-tagged, ``btagCSVV2 > 0.5`` strictly.

Only the columns the processor and a user's own NanoAOD notebook need come back, with the *full*
collections (not jet-filtered: the processor re-applies its cuts after ``pt_scale_up`` / ``pt_res_up``) and
their counters, event ids and charges, so that coffea's stock ``NanoAODSchema`` can open the parquet.

The cut values come from :mod:`agc_sx.constants`; func_adl reads the lambdas from this file's source and
inlines those names as literals, so the qastle carries the numbers. Cuts compare float32 columns with Python
floats, which NumPy evaluates in float32 - the precision the processor cuts in as well.
Keep every lambda on its own source line: func_adl cannot tell two lambdas on one line apart.
"""

# mypy: disable-error-code="attr-defined"
# (func_adl gives dicts a `.Zip()` inside query lambdas; plain Python typing cannot know that)

from __future__ import annotations

from typing import Any

from servicex.query import FuncADL_Uproot

from agc_sx.constants import (
    BTAG_WP,
    ELECTRON_CUTBASED,
    JET_ABS_ETA_MAX,
    JET_ID_MASK,
    LEPTON_ABS_ETA_MAX,
    LEPTON_PT_MIN,
    LEPTON_SIP3D_MAX,
    MIN_JETS,
    MUON_ISO_MAX,
    SKIM_JET_PT_MIN,
)


def skim_query(tree: str = "Events") -> Any:
    """The skim query, ready for ``servicex.Sample(Query=...)`` or ``.generate_selection_string()``."""
    return (
        FuncADL_Uproot()
        .FromTree(tree)
        # exactly one tight lepton (electron or muon)
        .Where(
            lambda e: {
                "pt": e.Electron_pt,
                "eta": e.Electron_eta,
                "cutBased": e.Electron_cutBased,
                "sip3d": e.Electron_sip3d,
            }
            .Zip()
            .Where(
                lambda el: el.pt > LEPTON_PT_MIN
                and abs(el.eta) < LEPTON_ABS_ETA_MAX
                and el.cutBased == ELECTRON_CUTBASED
                and el.sip3d < LEPTON_SIP3D_MAX
            )
            .Count()
            + {
                "pt": e.Muon_pt,
                "eta": e.Muon_eta,
                "tightId": e.Muon_tightId,
                "sip3d": e.Muon_sip3d,
                "iso": e.Muon_pfRelIso04_all,
            }
            .Zip()
            .Where(
                lambda mu: mu.pt > LEPTON_PT_MIN
                and abs(mu.eta) < LEPTON_ABS_ETA_MAX
                and mu.tightId
                and mu.sip3d < LEPTON_SIP3D_MAX
                and mu.iso < MUON_ISO_MAX
            )
            .Count()
            == 1
        )
        # at least four jets that pass the loosened pT threshold, eta and jet ID
        .Where(
            lambda e: {"pt": e.Jet_pt, "eta": e.Jet_eta, "jetId": e.Jet_jetId}
            .Zip()
            .Where(
                lambda j: j.pt > SKIM_JET_PT_MIN
                and abs(j.eta) < JET_ABS_ETA_MAX
                and (j.jetId & JET_ID_MASK) != 0
            )
            .Count()
            >= MIN_JETS
        )
        # at least one of those jets b-tagged
        .Where(
            lambda e: {"pt": e.Jet_pt, "eta": e.Jet_eta, "jetId": e.Jet_jetId, "btag": e.Jet_btagCSVV2}
            .Zip()
            .Where(
                lambda j: j.pt > SKIM_JET_PT_MIN
                and abs(j.eta) < JET_ABS_ETA_MAX
                and (j.jetId & JET_ID_MASK) != 0
                and j.btag > BTAG_WP
            )
            .Count()
            >= 1
        )
        # column pruning: full collections with their counters
        .Select(
            lambda e: {
                "run": e.run,
                "luminosityBlock": e.luminosityBlock,
                "event": e.event,
                "nJet": e.nJet,
                "nElectron": e.nElectron,
                "nMuon": e.nMuon,
                "Jet_pt": e.Jet_pt,
                "Jet_eta": e.Jet_eta,
                "Jet_phi": e.Jet_phi,
                "Jet_mass": e.Jet_mass,
                "Jet_btagCSVV2": e.Jet_btagCSVV2,
                "Jet_qgl": e.Jet_qgl,
                "Jet_jetId": e.Jet_jetId,
                "Electron_pt": e.Electron_pt,
                "Electron_eta": e.Electron_eta,
                "Electron_phi": e.Electron_phi,
                "Electron_mass": e.Electron_mass,
                "Electron_charge": e.Electron_charge,
                "Electron_cutBased": e.Electron_cutBased,
                "Electron_sip3d": e.Electron_sip3d,
                "Muon_pt": e.Muon_pt,
                "Muon_eta": e.Muon_eta,
                "Muon_phi": e.Muon_phi,
                "Muon_mass": e.Muon_mass,
                "Muon_charge": e.Muon_charge,
                "Muon_tightId": e.Muon_tightId,
                "Muon_sip3d": e.Muon_sip3d,
                "Muon_pfRelIso04_all": e.Muon_pfRelIso04_all,
            }
        )
    )
