"""A deterministic synthetic clinical corpus with outcome labels, for the embedded demo and for tests.

Patients have latent attributes (age, sex, chronic conditions, the reason for admission, a latent acuity);
outcomes (in-hospital death, length of stay, prolonged ventilation, ICD-9 diagnosis and procedure codes) follow
from them with noise. Notes observe the latent state only partly and noisily (vitals with measurement noise,
conditions mentioned or not, many phrasings), so a text classifier can learn the labels but not perfectly.
Discharge summaries (MIMIC-III style, with ``[**...**]`` de-identification placeholders) form the DAPT corpus;
admission notes (van Aken's eight sections, mentions of death removed) are the task inputs. DAPT and task
patients come from disjoint cohorts (separate random streams and id ranges), so nothing leaks between them.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------------------------------ catalogue


@dataclass(frozen=True)
class Condition:
    """A chronic condition: how notes name it, its ICD-9 3-digit code, home medications, prevalence at age
    65 and its change in log-odds per decade, and how much it adds to the latent acuity."""

    key: str
    code: str
    prevalence: float
    per_decade: float
    risk: float
    names: tuple[str, ...]
    meds: tuple[str, ...]


# fmt: off
CONDITIONS: tuple[Condition, ...] = (
    Condition("htn", "401", 0.55, 0.35, 0.0,
              names=("HTN", "hypertension", "essential hypertension", "poorly controlled hypertension"),
              meds=("lisinopril {10|20|40} mg daily", "amlodipine {5|10} mg daily",
                    "hydrochlorothiazide {12.5|25} mg daily", "losartan {25|50|100} mg daily")),
    Condition("hld", "272", 0.45, 0.25, 0.0,
              names=("hyperlipidemia", "HLD", "dyslipidemia", "hypercholesterolemia"),
              meds=("atorvastatin {10|20|40|80} mg daily", "simvastatin {20|40} mg qHS", "pravastatin 40 mg daily")),
    Condition("dm", "250", 0.28, 0.2, 0.15,
              names=("DM2", "type 2 diabetes mellitus", "diabetes mellitus type II", "NIDDM", "insulin-dependent DM"),
              meds=("metformin {500|850|1000} mg BID", "glipizide {5|10} mg daily",
                    "insulin glargine {10|18|24|30} units qHS", "insulin lispro sliding scale")),
    Condition("chf", "428", 0.12, 0.45, 0.45,
              names=("CHF", "congestive heart failure", "systolic CHF (EF {20|25|30|35}%)", "diastolic heart failure",
                     "HFrEF"),
              meds=("furosemide {20|40|80} mg daily", "carvedilol {6.25|12.5|25} mg BID", "spironolactone 25 mg daily",
                    "metoprolol succinate {25|50|100} mg daily")),
    Condition("cad", "414", 0.2, 0.45, 0.2,
              names=("CAD", "coronary artery disease", "CAD s/p PCI", "CAD s/p DES to LAD", "ischemic heart disease"),
              meds=("aspirin 81 mg daily", "clopidogrel 75 mg daily", "metoprolol tartrate {12.5|25|50} mg BID",
                    "isosorbide mononitrate {30|60} mg daily")),
    Condition("afib", "427", 0.1, 0.55, 0.25,
              names=("atrial fibrillation", "AFib", "paroxysmal AF", "chronic atrial fibrillation", "Afib on coumadin"),
              meds=("warfarin {2.5|5|7.5} mg daily", "apixaban 5 mg BID", "diltiazem ER {120|180|240} mg daily",
                    "digoxin 0.125 mg daily")),
    Condition("copd", "496", 0.1, 0.35, 0.4,
              names=("COPD", "chronic obstructive pulmonary disease", "emphysema", "COPD on {2|3|4}L home O2",
                     "severe COPD (FEV1 {0.8|0.9|1.1}L)"),
              meds=("tiotropium 18 mcg inh daily", "albuterol inhaler 2 puffs q4-6h PRN",
                    "fluticasone-salmeterol 250/50 1 inh BID", "prednisone {5|10} mg daily")),
    Condition("ckd", "585", 0.1, 0.45, 0.35,
              names=("CKD", "chronic kidney disease stage III", "CKD (baseline Cr {1.6|1.9|2.3})", "ESRD on HD MWF",
                     "CKD stage IV"),
              meds=("calcium acetate 667 mg TID with meals", "sevelamer 800 mg TID", "calcitriol 0.25 mcg daily")),
    Condition("cirrhosis", "571", 0.04, 0.0, 0.6,
              names=("cirrhosis", "EtOH cirrhosis", "HCV cirrhosis c/b ascites", "alcoholic liver disease",
                     "cirrhosis (MELD {14|18|22})"),
              meds=("lactulose 30 mL TID", "rifaximin 550 mg BID", "spironolactone {50|100} mg daily",
                    "nadolol 20 mg daily")),
    Condition("asthma", "493", 0.08, -0.1, 0.0,
              names=("asthma", "mild intermittent asthma", "reactive airway disease"),
              meds=("albuterol inhaler PRN", "montelukast 10 mg daily", "budesonide-formoterol 160/4.5 2 puffs BID")),
    Condition("dementia", "290", 0.03, 0.9, 0.5,
              names=("dementia", "Alzheimer's dementia", "vascular dementia",
                     "advanced dementia, nonverbal at baseline"),
              meds=("donepezil {5|10} mg qHS", "memantine 10 mg BID", "quetiapine 25 mg qHS")),
    Condition("cva", "438", 0.05, 0.5, 0.25,
              names=("prior CVA", "h/o stroke with residual R hemiparesis", "old L MCA infarct", "prior TIA/CVA"),
              meds=("aspirin 325 mg daily", "clopidogrel 75 mg daily")),
    Condition("cancer", "199", 0.07, 0.3, 0.7,
              names=("metastatic lung cancer", "NSCLC on chemotherapy", "breast cancer s/p mastectomy",
                     "colon cancer s/p resection", "prostate cancer", "DLBCL on R-CHOP"),
              meds=("ondansetron 8 mg q8h PRN", "oxycodone {5|10} mg q4h PRN", "dexamethasone 4 mg daily")),
    Condition("depression", "311", 0.15, -0.1, 0.0,
              names=("depression", "major depressive disorder", "anxiety/depression"),
              meds=("sertraline {50|100} mg daily", "citalopram {20|40} mg daily", "bupropion XL 150 mg daily")),
    Condition("hypothyroid", "244", 0.08, 0.2, 0.0,
              names=("hypothyroidism", "hypothyroid", "s/p thyroidectomy on replacement"),
              meds=("levothyroxine {50|75|88|112} mcg daily",)),
    Condition("obesity", "278", 0.15, -0.2, 0.1,
              names=("obesity", "morbid obesity (BMI {38|42|47})", "obesity, BMI {32|35}"),
              meds=()),
    Condition("gerd", "530", 0.15, 0.1, 0.0,
              names=("GERD", "gastroesophageal reflux"),
              meds=("omeprazole {20|40} mg daily", "pantoprazole 40 mg daily")),
    Condition("etoh", "303", 0.07, -0.3, 0.25,
              names=("EtOH abuse", "alcohol use disorder", "alcohol dependence with h/o withdrawal seizures"),
              meds=("thiamine 100 mg daily", "folic acid 1 mg daily")),
    Condition("pvd", "443", 0.05, 0.5, 0.2,
              names=("PVD", "peripheral vascular disease", "PAD s/p fem-pop bypass"),
              meds=("cilostazol 100 mg BID",)),
    Condition("anemia", "285", 0.08, 0.3, 0.1,
              names=("chronic anemia", "iron deficiency anemia", "anemia of chronic disease"),
              meds=("ferrous sulfate 325 mg daily",)),
    Condition("osa", "327", 0.06, 0.1, 0.05,
              names=("OSA on CPAP", "obstructive sleep apnea"),
              meds=()),
    Condition("gout", "274", 0.05, 0.3, 0.0,
              names=("gout",),
              meds=("allopurinol {100|300} mg daily", "colchicine 0.6 mg daily")),
    Condition("hiv", "042", 0.015, -0.4, 0.3,
              names=("HIV on HAART (last CD4 {250|420|610})", "HIV"),
              meds=("emtricitabine-tenofovir 1 tab daily", "dolutegravir 50 mg daily")),
    Condition("oa", "715", 0.15, 0.4, 0.0,
              names=("osteoarthritis", "OA of the knees", "DJD"),
              meds=("acetaminophen 650 mg q6h PRN",)),
)
CONDITION_BY_KEY = {c.key: c for c in CONDITIONS}


@dataclass(frozen=True)
class Problem:
    """A reason for admission: complaints and story sentences for the notes, ICU/service, codes it brings (with
    probabilities), and its effect on acuity, length of stay, ventilation and death."""

    key: str
    title: str
    weight: float
    service: str
    severity: float  # shift of the latent acuity
    los: float  # median length of stay (days) at zero acuity
    vent: float  # shift of the log-odds of mechanical ventilation
    death: float  # shift of the log-odds of in-hospital death
    age: tuple[float, float]  # mean and standard deviation
    complaints: tuple[str, ...]
    story: tuple[str, ...]
    ed: tuple[str, ...]
    exam: tuple[tuple[str, str], ...]  # (system, finding)
    dx: tuple[tuple[str, float], ...]  # (ICD-9 code, probability)
    proc: tuple[tuple[str, float], ...]
    course: tuple[str, ...]
    fever: bool = False
    implies: tuple[str, ...] = ()  # chronic conditions this problem implies


PROBLEMS: tuple[Problem, ...] = (
    Problem(
        "pna", "community acquired pneumonia", 10, "MEDICINE",
        severity=0.3, los=5.0, vent=0.2, death=0.2, age=(66.0, 15.0), fever=True,
        complaints=("cough and fever", "shortness of breath", "SOB, fever", "productive cough", "fevers, chills"),
        story=("{He} reports {2|3|4|5} days of productive cough with {yellow|green|rust-colored} sputum.",
               "Associated with subjective fevers, chills and pleuritic chest pain.",
               "CXR showed a {RLL|LLL|RML|multifocal} opacity concerning for pneumonia.",
               "{His} family noted increasing dyspnea and decreased PO intake.",
               "Sick contacts at home with a similar illness."),
        ed=("{He} received ceftriaxone and azithromycin.",
            "Blood cultures were sent and {he} was given vancomycin/cefepime.",
            "{He} was placed on {4|5|6}L NC with improvement in sats."),
        exam=(("Lungs", "crackles at the {right|left} base"), ("Lungs", "bronchial breath sounds {RLL|LLL}, egophony"),
              ("Lungs", "coarse rhonchi bilaterally")),
        dx=(("486", 0.9), ("518", 0.35), ("038", 0.2), ("507", 0.08)),
        proc=(("332", 0.08),),
        course=("Treated for CAP with {ceftriaxone/azithromycin|levofloxacin|vancomycin/cefepime}.",
                "Sputum culture grew {S. pneumoniae|H. influenzae|normal flora}.",
                "Completed a {5|7|8} day course of antibiotics."),
    ),
    Problem(
        "sepsis", "urosepsis", 8, "MEDICINE",
        severity=0.8, los=6.0, vent=0.3, death=0.5, age=(74.0, 12.0), fever=True,
        complaints=("fever", "altered mental status", "hypotension", "confusion and fever", "lethargy"),
        story=("Per {his} {daughter|son|wife|husband|NH staff}, {he} has been more confused over {1|2|3} days.",
               "{He} endorses dysuria and urinary frequency.", "UA was grossly positive with {>50|>100} WBC.",
               "{He} has an indwelling Foley catheter.", "Noted to have rigors at the nursing home."),
        ed=("{He} received {2|3|4}L IVF and was started on vancomycin and zosyn.",
            "Lactate was {2.8|3.5|4.6|5.9}, and a code sepsis was called.", "A right IJ CVL was placed."),
        exam=(("Abd", "suprapubic tenderness"), ("Back", "CVA tenderness on the {right|left}"),
              ("General", "toxic appearing")),
        dx=(("599", 0.85), ("038", 0.7), ("995", 0.6), ("785", 0.3), ("590", 0.2)),
        proc=(("389", 0.4),),
        course=("Urine culture grew {E. coli|Klebsiella|Proteus|Enterococcus}; antibiotics narrowed per sensitivities.",
                "Required norepinephrine briefly, weaned off by hospital day {2|3}."),
    ),
    Problem(
        "chf", "acute on chronic systolic heart failure exacerbation", 8, "MEDICINE",
        severity=0.3, los=5.0, vent=-0.3, death=0.1, age=(72.0, 12.0), implies=("chf",),
        complaints=("shortness of breath", "dyspnea on exertion", "leg swelling", "orthopnea", "weight gain and SOB"),
        story=("{He} reports a {5|8|10|12} lb weight gain over the past {week|two weeks}.",
               "Endorses {2|3|4}-pillow orthopnea and PND.",
               "Admits to dietary indiscretion and missed doses of lasix.", "BNP was {1200|2400|4800|8900}.",
               "CXR with pulmonary vascular congestion and bilateral effusions."),
        ed=("{He} was given IV lasix {40|80} mg with good UOP.", "Placed on BiPAP for respiratory distress.",
            "Nitro drip was started."),
        exam=(("Neck", "JVP elevated to the angle of the jaw"), ("Lungs", "bibasilar crackles"),
              ("Ext", "{2+|3+} pitting edema to the {knees|thighs}"), ("CV", "S3 gallop")),
        dx=(("428", 0.97), ("402", 0.3), ("518", 0.2), ("584", 0.3)),
        proc=(("887", 0.3),),
        course=("Diuresed with IV furosemide, net negative {4|6|8} liters.",
                "TTE showed EF {20|25|30}% with global hypokinesis."),
    ),
    Problem(
        "mi", "NSTEMI", 8, "CARDIOLOGY",
        severity=0.1, los=3.5, vent=-0.6, death=-0.1, age=(68.0, 11.0),
        complaints=("chest pain", "substernal chest pressure", "chest pain radiating to the left arm", "CP",
                    "epigastric discomfort"),
        story=("Pain began at rest, {6|7|8|9}/10, pressure-like, with diaphoresis and nausea.",
               "ECG showed {ST depressions in V4-V6|TWI in the lateral leads|ST elevations in II, III, aVF}.",
               "Troponin was {0.12|0.45|1.8|4.2}.", "Similar but milder exertional pain over the past month."),
        ed=("{He} was given aspirin 325, SL nitro x3 and started on a heparin drip.",
            "Cardiology was consulted for urgent cath.", "Received atorvastatin 80 and plavix load."),
        exam=(("CV", "RRR, no murmurs"), ("General", "diaphoretic, uncomfortable")),
        dx=(("410", 0.95), ("414", 0.8), ("427", 0.15), ("428", 0.15)),
        proc=(("372", 0.8), ("885", 0.75), ("360", 0.55), ("006", 0.45), ("361", 0.1)),
        course=("Cardiac cath showed {a 90% LAD lesion|a totally occluded RCA|3-vessel disease}.",
                "Started on aspirin, atorvastatin, metoprolol and clopidogrel."),
    ),
    Problem(
        "gib", "upper GI bleed", 7, "MEDICINE",
        severity=0.5, los=4.0, vent=-0.5, death=0.1, age=(65.0, 15.0),
        complaints=("melena", "bright red blood per rectum", "coffee-ground emesis", "hematemesis", "black stools"),
        story=("{He} reports {2|3|several} episodes of dark tarry stools since yesterday.",
               "Associated with lightheadedness and near-syncope on standing.",
               "Hct was {21|24|26} from a baseline of {35|38}.",
               "{He} takes {ibuprofen daily for back pain|naproxen for knee pain|aspirin and warfarin}.",
               "NG lavage was positive for coffee grounds."),
        ed=("{He} was transfused {1|2|3} units pRBCs.", "Started on IV pantoprazole drip; GI was consulted.",
            "Two large-bore IVs were placed."),
        exam=(("Rectal", "guaiac positive, melena on DRE"), ("General", "pale"), ("Abd", "mild epigastric tenderness")),
        dx=(("578", 0.8), ("531", 0.35), ("456", 0.15), ("285", 0.6), ("280", 0.2)),
        proc=(("451", 0.9), ("990", 0.8), ("452", 0.2)),
        course=("EGD showed {a clean-based duodenal ulcer|a gastric ulcer with a visible vessel, clipped|"
                "grade II varices, banded}.",
                "Hct remained stable after transfusion."),
    ),
    Problem(
        "stroke", "acute ischemic stroke", 6, "NEUROLOGY",
        severity=0.6, los=6.0, vent=0.4, death=0.4, age=(71.0, 12.0),
        complaints=("left-sided weakness", "slurred speech", "facial droop", "right arm weakness", "aphasia"),
        story=("Last known well was {1|2|3|5} hours prior to arrival.",
               "{His} {wife|daughter|neighbor} found {him} with {slurred speech|aphasia|a facial droop}.",
               "NIHSS on arrival was {4|7|11|16}.",
               "CTA showed {an M1 occlusion|a distal M2 cutoff|no large vessel occlusion}."),
        ed=("tPA was administered.", "{He} was taken for thrombectomy.", "Code stroke was called on arrival."),
        exam=(("Neuro", "{left|right} hemiparesis {2|3|4}/5, dysarthria"),
              ("Neuro", "{left|right} facial droop, pronator drift")),
        dx=(("434", 0.9), ("342", 0.4), ("784", 0.4), ("438", 0.1)),
        proc=(("991", 0.25), ("887", 0.3), ("966", 0.15), ("431", 0.15)),
        course=("MRI confirmed a {left|right} MCA territory infarct.",
                "Started on aspirin and high-intensity statin; PT/OT/speech."),
    ),
    Problem(
        "ich", "intracerebral hemorrhage", 4, "NEUROSURGERY",
        severity=1.5, los=9.0, vent=1.6, death=1.1, age=(70.0, 13.0),
        complaints=("headache", "found down", "unresponsive", "worst headache of life", "altered mental status"),
        story=("{He} was found down at home by {his} {wife|son|roommate}.", "GCS at the scene was {6|8|10|12}.",
               "Head CT showed a {large|moderate} {left basal ganglia|right parietal|cerebellar} bleed with shift.",
               "{He} is on {warfarin|apixaban|no anticoagulation}.", "SBP on arrival was {190|210|230}."),
        ed=("{He} was intubated for airway protection.", "Nicardipine drip was started for BP control.",
            "Neurosurgery placed an EVD.", "Received Kcentra for reversal."),
        exam=(("Neuro", "GCS {6|7|9|11}, pupils {sluggish|asymmetric}"), ("General", "intubated, sedated")),
        dx=(("431", 0.95), ("348", 0.4), ("430", 0.1), ("518", 0.3)),
        proc=(("022", 0.4), ("013", 0.2)),
        course=("Repeat head CT showed {stable|expanding} hemorrhage.",
                "Goals of care were discussed with the family."),
    ),
    Problem(
        "copd", "COPD exacerbation", 5, "MEDICINE",
        severity=0.5, los=4.5, vent=0.8, death=0.0, age=(69.0, 10.0), implies=("copd",),
        complaints=("shortness of breath", "wheezing", "SOB", "increased work of breathing", "dyspnea"),
        story=("{He} reports worsening dyspnea and increased sputum production over {3|4|5} days.",
               "Using {his} albuterol inhaler every {1|2} hours without relief.",
               "ABG was 7.{28|31|33}/{58|66|72}/{55|62|70}.", "Recent URI symptoms."),
        ed=("{He} received nebs, solumedrol 125 mg and azithromycin.", "BiPAP was started for hypercarbia.",
            "Magnesium 2 g was given."),
        exam=(("Lungs", "diffuse expiratory wheezes, prolonged expiratory phase"), ("Lungs", "poor air movement"),
              ("General", "tripoding, speaking in short sentences")),
        dx=(("491", 0.9), ("518", 0.4), ("496", 0.3)),
        proc=(("939", 0.45),),
        course=("Treated with nebulizers, a prednisone burst and azithromycin.", "Weaned from BiPAP to {2|3}L NC."),
    ),
    Problem(
        "dka", "diabetic ketoacidosis", 3, "MEDICINE",
        severity=0.2, los=3.0, vent=-0.5, death=-0.4, age=(40.0, 15.0), implies=("dm",),
        complaints=("nausea and vomiting", "hyperglycemia", "abdominal pain", "polyuria, polydipsia"),
        story=("{He} ran out of insulin {3|5|7} days ago.", "Fingerstick glucose read HIGH at home.",
               "Anion gap was {22|28|31} with serum bicarb {6|9|12}.", "Associated with diffuse abdominal pain."),
        ed=("An insulin drip was started.", "{He} received {3|4|5}L NS with potassium repletion."),
        exam=(("General", "Kussmaul respirations, fruity breath"), ("HEENT", "dry mucous membranes")),
        dx=(("250", 1.0), ("276", 0.7)),
        proc=(("389", 0.2),),
        course=("Anion gap closed on hospital day {1|2}; transitioned to subcutaneous insulin.",
                "Seen by the diabetes educator."),
    ),
    Problem(
        "aki", "acute kidney injury", 4, "MEDICINE",
        severity=0.3, los=5.0, vent=-0.4, death=0.1, age=(70.0, 13.0),
        complaints=("decreased urine output", "weakness", "abnormal labs", "fatigue and poor PO intake"),
        story=("Routine labs showed creatinine {3.1|4.2|5.6} from a baseline of {0.9|1.2|1.6}.",
               "Potassium was {5.9|6.4|7.1} with peaked T waves.",
               "Recently started on {lisinopril|ibuprofen|bactrim}.",
               "Poor PO intake with {diarrhea|vomiting} for several days."),
        ed=("{He} received calcium gluconate, insulin/dextrose and kayexalate.", "Renal was consulted.",
            "IVF were given."),
        exam=(("HEENT", "dry mucous membranes"), ("Ext", "no edema")),
        dx=(("584", 0.95), ("276", 0.6), ("585", 0.3)),
        proc=(("399", 0.35), ("389", 0.3)),
        course=("Creatinine improved with IVF and holding nephrotoxins.", "Renal ultrasound without hydronephrosis."),
    ),
    Problem(
        "panc", "acute pancreatitis", 3, "MEDICINE",
        severity=0.3, los=5.0, vent=0.0, death=-0.1, age=(50.0, 15.0),
        complaints=("epigastric pain", "abdominal pain radiating to the back", "nausea, vomiting and abdominal pain"),
        story=("Lipase was {890|2400|5600}.", "Pain began after a {large meal|drinking binge}.",
               "CT abdomen showed peripancreatic stranding {without|with} necrosis.",
               "RUQ US with {gallstones|no gallstones}."),
        ed=("{He} received aggressive IVF and IV dilaudid.", "Made NPO."),
        exam=(("Abd", "epigastric tenderness with guarding"), ("Abd", "distended, hypoactive bowel sounds")),
        dx=(("577", 0.97), ("303", 0.3), ("574", 0.3)),
        proc=(("511", 0.3), ("966", 0.15)),
        course=("Diet advanced slowly.", "ERCP with sphincterotomy and stone extraction."),
    ),
    Problem(
        "hip", "hip fracture after mechanical fall", 5, "ORTHOPAEDICS",
        severity=0.0, los=5.0, vent=-0.6, death=0.0, age=(80.0, 9.0),
        complaints=("s/p fall", "fall from standing", "hip pain after fall", "mechanical fall",
                    "unable to bear weight"),
        story=("{He} tripped over a {rug|curb|step} at home and landed on {his} {left|right} side.",
               "Denies head strike or LOC.", "Films showed a displaced {femoral neck|intertrochanteric} fracture.",
               "Unable to bear weight since the fall."),
        ed=("Ortho was consulted for operative fixation.", "Pain controlled with IV morphine."),
        exam=(("Ext", "{left|right} leg shortened and externally rotated"), ("MSK", "pain with passive hip ROM")),
        dx=(("820", 0.95), ("E888", 0.85), ("E849", 0.6), ("285", 0.3)),
        proc=(("793", 0.55), ("815", 0.45), ("990", 0.3)),
        course=("Underwent {ORIF|hemiarthroplasty} on hospital day {1|2}.", "Worked with PT; discharged to rehab."),
    ),
    Problem(
        "mvc", "polytrauma after motor vehicle collision", 3, "TRAUMA SURGERY",
        severity=0.9, los=7.0, vent=0.9, death=0.1, age=(40.0, 17.0),
        complaints=("s/p MVC", "polytrauma", "trauma", "MVC rollover", "motorcycle crash"),
        story=("{He} was the {restrained driver|unrestrained passenger|helmeted motorcyclist} in a "
               "{high speed|rollover} collision.",
               "Prolonged extrication at the scene.", "FAST exam was {positive|negative}.",
               "CT showed {multiple rib fractures|a splenic laceration|a pneumothorax|a liver laceration}."),
        ed=("A chest tube was placed in the trauma bay.", "{He} was intubated for combativeness.",
            "Received 2 units of uncrossmatched blood."),
        exam=(("Chest", "{left|right} chest wall tenderness, crepitus"),
              ("Abd", "FAST {positive|negative}, tender LUQ")),
        dx=(("807", 0.6), ("860", 0.35), ("865", 0.25), ("864", 0.2), ("E812", 0.8), ("852", 0.2)),
        proc=(("340", 0.4), ("990", 0.5), ("415", 0.15), ("870", 0.3)),
        course=("Managed nonoperatively with serial exams.", "Taken to the OR for exploratory laparotomy."),
    ),
    Problem(
        "od", "intentional overdose", 3, "MEDICINE",
        severity=0.7, los=3.0, vent=1.1, death=-0.5, age=(38.0, 14.0),
        complaints=("altered mental status", "intentional ingestion", "unresponsive", "overdose"),
        story=("{He} was found with empty bottles of {acetaminophen|amitriptyline|lorazepam|oxycodone} next to {him}.",
               "Tox screen positive for {benzodiazepines|opiates|TCAs|ethanol}.", "Unknown time of ingestion.",
               "Per EMS, {he} was {minimally responsive|somnolent but arousable}."),
        ed=("{He} received narcan with minimal response.", "Poison control was contacted; NAC was started.",
            "{He} was intubated for airway protection."),
        exam=(("Neuro", "somnolent, pupils {pinpoint|dilated}"), ("General", "intubated, sedated")),
        dx=(("965", 0.5), ("969", 0.5), ("E950", 0.8), ("305", 0.4), ("311", 0.3)),
        proc=(("941", 0.2),),
        course=("Psychiatry was consulted; patient was placed on a 1:1 sitter.",),
    ),
    Problem(
        "chole", "acute cholecystitis", 3, "GENERAL SURGERY",
        severity=-0.3, los=3.0, vent=-0.8, death=-0.7, age=(55.0, 16.0), fever=True,
        complaints=("RUQ pain", "right upper quadrant pain", "abdominal pain and fever", "postprandial abdominal pain"),
        story=("Pain started after a fatty meal and has been constant for {1|2|3} days.",
               "RUQ ultrasound showed gallbladder wall thickening and pericholecystic fluid.",
               "Murphy's sign was positive.", "LFTs with {mild|no} transaminitis."),
        ed=("{He} was started on unasyn.", "Surgery was consulted."),
        exam=(("Abd", "RUQ tenderness, positive Murphy's sign"),),
        dx=(("574", 0.85), ("575", 0.5)),
        proc=(("512", 0.85), ("870", 0.2)),
        course=("Underwent laparoscopic cholecystectomy without complication.",),
    ),
    Problem(
        "pe", "pulmonary embolism", 3, "MEDICINE",
        severity=0.5, los=4.0, vent=0.0, death=0.1, age=(58.0, 16.0),
        complaints=("shortness of breath", "pleuritic chest pain", "dyspnea", "syncope"),
        story=("Recent {long car trip|knee surgery|hospitalization} with immobilization.",
               "CTA chest showed {bilateral|saddle|segmental} pulmonary emboli with RV strain.",
               "LENIs with {left|right} femoral DVT.", "D-dimer elevated."),
        ed=("A heparin drip was started.", "Echo showed RV dilation."),
        exam=(("Ext", "{left|right} calf swelling and tenderness"), ("CV", "tachycardic, loud P2")),
        dx=(("415", 0.95), ("453", 0.6)),
        proc=(("387", 0.15), ("887", 0.4)),
        course=("Transitioned to apixaban.", "Hypercoagulability workup sent."),
    ),
    Problem(
        "cabg", "coronary artery disease, admitted for elective CABG", 5, "CARDIOTHORACIC",
        severity=-0.2, los=6.0, vent=-0.5, death=-0.6, age=(66.0, 9.0), implies=("cad",),
        complaints=("exertional angina", "scheduled for CABG", "chest pain with exertion", "abnormal stress test"),
        story=("Cath showed {3-vessel|left main} disease not amenable to PCI.",
               "Stress test was positive with {anterior|inferior} ischemia.",
               "{He} presents for elective surgical revascularization.",
               "Echo with EF {40|50|55}% and {moderate AS|mild MR|no valvular disease}."),
        ed=("Admitted directly to the CVICU after surgery.",),
        exam=(("Chest", "sternal incision clean, dry, intact"), ("CV", "RRR, soft systolic murmur")),
        dx=(("414", 0.97), ("424", 0.3), ("427", 0.35), ("V158", 0.3)),
        proc=(("361", 0.9), ("396", 0.9), ("352", 0.25), ("372", 0.3), ("967", 0.5)),
        course=("Underwent CABG x{2|3|4} (LIMA-LAD, SVG-OM, SVG-PDA).",
                "Extubated on POD 0; chest tubes removed POD {1|2}."),
    ),
    Problem(
        "cellulitis", "lower extremity cellulitis", 3, "MEDICINE",
        severity=-0.4, los=4.0, vent=-1.0, death=-0.8, age=(60.0, 15.0), fever=True,
        complaints=("leg redness and swelling", "leg pain", "cellulitis", "foot wound"),
        story=("Redness of the {left|right} lower leg spreading over {2|3|4} days.",
               "Has a nonhealing ulcer on the {heel|great toe}.", "X-ray concerning for osteomyelitis.",
               "Low grade fevers at home."),
        ed=("{He} was started on IV vancomycin.", "Margins of erythema were marked."),
        exam=(("Ext", "{left|right} LE erythema, warmth and tenderness to the mid-shin"),
              ("Skin", "ulcer with purulent drainage")),
        dx=(("682", 0.95), ("730", 0.25), ("707", 0.2)),
        proc=(("862", 0.3), ("841", 0.08)),
        course=("Erythema receded on IV vancomycin; transitioned to oral antibiotics.",),
    ),
    Problem(
        "seizure", "seizure", 3, "NEUROLOGY",
        severity=0.2, los=3.0, vent=0.3, death=-0.5, age=(48.0, 18.0),
        complaints=("seizure", "generalized tonic-clonic seizure", "witnessed seizure", "convulsions"),
        story=("Witnessed generalized tonic-clonic activity lasting {2|5|10} minutes.",
               "Post-ictal confusion on arrival.", "Missed doses of {keppra|dilantin}.",
               "Tongue laceration and incontinence."),
        ed=("{He} received ativan {2|4} mg IV and a keppra load.", "{He} was intubated for status epilepticus."),
        exam=(("Neuro", "post-ictal, oriented x1, moving all extremities"), ("HEENT", "lateral tongue laceration")),
        dx=(("345", 0.8), ("780", 0.4)),
        proc=(("891", 0.5),),
        course=("EEG without ongoing seizure activity.", "Antiepileptic regimen adjusted."),
    ),
    Problem(
        "sbo", "small bowel obstruction", 3, "GENERAL SURGERY",
        severity=0.2, los=5.0, vent=-0.3, death=-0.2, age=(64.0, 14.0),
        complaints=("abdominal pain and distension", "nausea and vomiting", "abdominal pain", "obstipation"),
        story=("{He} has a history of {prior laparotomy|hernia repair|colectomy}.",
               "No flatus or bowel movement for {2|3} days.",
               "CT showed dilated loops of small bowel with a transition point.", "Bilious emesis x{3|5}."),
        ed=("An NGT was placed with {500|900|1200} cc of bilious output.", "Surgery was consulted."),
        exam=(("Abd", "distended, tympanic, diffusely tender"), ("Abd", "high-pitched bowel sounds")),
        dx=(("560", 0.95), ("568", 0.3), ("567", 0.1)),
        proc=(("545", 0.35), ("456", 0.25), ("966", 0.2)),
        course=("Managed with bowel rest and NGT decompression.",
                "Taken to the OR for exploratory laparotomy and lysis of adhesions."),
    ),
)
PROBLEM_BY_KEY = {p.key: p for p in PROBLEMS}

# ICD-9 codes, 3 characters (4 for V/E codes), with a short name for discharge diagnoses.
DIAGNOSIS_NAMES: dict[str, str] = {
    "401": "hypertension", "272": "hyperlipidemia", "250": "diabetes mellitus", "428": "congestive heart failure",
    "414": "coronary artery disease", "427": "atrial fibrillation", "496": "COPD", "585": "chronic kidney disease",
    "571": "cirrhosis", "493": "asthma", "290": "dementia", "438": "history of stroke", "199": "malignancy",
    "311": "depression", "244": "hypothyroidism", "278": "obesity", "530": "GERD", "303": "alcohol dependence",
    "443": "peripheral vascular disease", "285": "anemia", "327": "obstructive sleep apnea", "274": "gout",
    "042": "HIV", "715": "osteoarthritis", "486": "pneumonia", "518": "acute respiratory failure", "038": "sepsis",
    "507": "aspiration pneumonitis", "599": "urinary tract infection", "995": "severe sepsis", "785": "septic shock",
    "590": "pyelonephritis", "402": "hypertensive heart disease", "584": "acute kidney injury",
    "410": "acute myocardial infarction", "578": "gastrointestinal hemorrhage", "531": "gastric ulcer",
    "456": "esophageal varices", "280": "iron deficiency anemia", "434": "ischemic stroke", "342": "hemiparesis",
    "784": "aphasia", "431": "intracerebral hemorrhage", "348": "cerebral edema", "430": "subarachnoid hemorrhage",
    "491": "COPD exacerbation", "276": "electrolyte derangement", "577": "acute pancreatitis", "574": "cholelithiasis",
    "575": "cholecystitis", "820": "hip fracture", "E888": "fall", "E849": "fall at home", "807": "rib fractures",
    "860": "traumatic pneumothorax", "865": "splenic injury", "864": "liver injury", "E812": "motor vehicle collision",
    "852": "subdural hemorrhage", "965": "opioid/acetaminophen poisoning", "969": "psychotropic poisoning",
    "E950": "intentional self-harm", "305": "substance abuse", "415": "pulmonary embolism",
    "453": "deep venous thrombosis", "424": "aortic valve disease", "V158": "history of tobacco use",
    "682": "cellulitis", "730": "osteomyelitis", "707": "pressure ulcer", "345": "epilepsy", "780": "seizure",
    "560": "small bowel obstruction", "568": "peritoneal adhesions", "567": "peritonitis", "293": "delirium",
    "V586": "long-term anticoagulation", "E878": "surgical complication",
}
# ICD-9 procedure codes cut to 3 characters (e.g. 96.71/96.72 -> 967, 96.04 -> 960, 38.93 -> 389).
PROCEDURE_NAMES: dict[str, str] = {
    "967": "mechanical ventilation", "960": "endotracheal intubation", "311": "tracheostomy",
    "966": "enteral nutrition", "431": "PEG tube placement", "389": "central venous catheter",
    "990": "transfusion of packed red cells", "399": "hemodialysis", "332": "bronchoscopy",
    "887": "transthoracic echocardiogram", "372": "cardiac catheterization", "885": "coronary angiography",
    "360": "coronary stent", "006": "PCI", "361": "CABG", "396": "cardiopulmonary bypass",
    "352": "aortic valve replacement", "451": "EGD", "452": "colonoscopy", "991": "tPA administration",
    "022": "external ventricular drain", "013": "craniotomy", "939": "non-invasive ventilation", "511": "ERCP",
    "793": "ORIF", "815": "hip hemiarthroplasty", "340": "chest tube", "415": "splenectomy", "870": "CT head",
    "941": "psychiatric evaluation", "512": "cholecystectomy", "387": "IVC filter", "862": "wound debridement",
    "841": "toe amputation", "891": "EEG", "545": "lysis of adhesions", "456": "small bowel resection",
    "549": "paracentesis", "996": "cardioversion",
}
# fmt: on


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task as written by the van Aken / BEEP scripts: file prefix, label column, label kind."""

    name: str
    prefix: str
    label_column: str
    kind: str  # "binary" | "multiclass" | "multilabel"
    num_classes: int  # single-label tasks; 0 for multi-label
    splits: tuple[str, str, str] = ("train", "val", "test")

    def file(self, split: str) -> str:
        """File name of one split (``train``, ``val``/``dev``, ``test``)."""
        return f"{self.prefix}_{split}.csv"


TASKS: dict[str, TaskSpec] = {
    "mortality": TaskSpec("mortality", "MP_IN_adm", "hospital_expire_flag", "binary", 2),
    "los": TaskSpec("los", "LOS_WEEKS_adm", "los_label", "multiclass", 4),
    "pmv": TaskSpec("pmv", "pmv", "label", "binary", 2, ("train", "dev", "test")),
    "diagnoses": TaskSpec("diagnoses", "DIA_GROUPS_3_DIGITS_adm", "short_codes", "multilabel", 0),
    "procedures": TaskSpec("procedures", "PRO_GROUPS_3_DIGITS_adm", "short_codes", "multilabel", 0),
}
_TASK_ALIASES = {"mor": "mortality", "diag": "diagnoses", "proc": "procedures"}

ADMISSION_SECTIONS = (
    "CHIEF COMPLAINT",
    "PRESENT ILLNESS",
    "MEDICAL HISTORY",
    "MEDICATION ON ADMISSION",
    "ALLERGIES",
    "PHYSICAL EXAM",
    "FAMILY HISTORY",
    "SOCIAL HISTORY",
)
# Demo sizes for SmolLM2-135M on 2 CPU cores (~160 tokens/s forward+backward, ~700 tokens/s forward): 600 DAPT
# notes give ~540 training notes, one no-packing epoch at 128 tokens in ~7 minutes; 600 task patients give ~410
# mortality training notes (fewer for LOS/PMV/PROC, whose cohorts are subsets).
DEFAULT_DAPT_NOTES = 600
DEFAULT_TASK_PATIENTS = 600
COHORT_BASE = {"task": 10_000_000, "dapt": 30_000_000}  # disjoint subject-id ranges (hadm_id = subject_id + 10M)
DEATH_WORDS = re.compile(r"\b(died|dies|die|dying|death|deaths|dead|deceased|expired?|passed away|demise)\b", re.I)


def task_spec(name: str) -> TaskSpec:
    """The task called ``name`` (mortality|los|pmv|diagnoses|procedures, or MOR/DIAG/PROC), case-insensitive."""
    key = _TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} (or MOR, DIAG, PROC)")
    return TASKS[key]


# ------------------------------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class Patient:
    """Latent attributes of one admission and the outcomes that follow from them."""

    subject_id: int
    hadm_id: int
    age: int
    sex: str
    conditions: tuple[str, ...]
    problem: str
    severity: float
    smoker: str
    ventilated: bool
    vent_days: float
    los_days: float
    died: bool
    diagnoses: tuple[str, ...]
    procedures: tuple[str, ...]
    admit: dt.date

    @property
    def los_label(self) -> int:
        """van Aken's length-of-stay class: 0 <= 3 days, 1 > 3-7, 2 > 7-14, 3 > 14."""
        return sum(self.los_days > d for d in (3, 7, 14))

    @property
    def prolonged_ventilation(self) -> bool:
        """BEEP's PMV label: mechanical ventilation for more than 7 days."""
        return self.ventilated and self.vent_days > 7


def _sigmoid(x: float) -> float:
    """The logistic function."""
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    """Log-odds of a probability."""
    return math.log(p / (1.0 - p))


def generate_patients(n: int, seed: int = 0, cohort: str = "task") -> list[Patient]:
    """``n`` patients drawn deterministically from ``seed``; ``cohort`` (``task`` or ``dapt``) selects a separate
    random stream and id range, so the DAPT corpus never shares a patient with the task data."""
    if cohort not in COHORT_BASE:
        raise ValueError(f"cohort must be one of {', '.join(COHORT_BASE)}, got {cohort!r}")
    if not 0 <= n < 10_000_000:
        raise ValueError(f"n must be in [0, 10,000,000), got {n}")
    rng = random.Random(f"minilora-synthetic:{cohort}:{seed}")
    weights = [p.weight for p in PROBLEMS]
    return [_patient(rng, COHORT_BASE[cohort] + i, rng.choices(PROBLEMS, weights)[0]) for i in range(n)]


def _patient(rng: random.Random, subject_id: int, problem: Problem) -> Patient:
    """Draw one admission: demographics, conditions, acuity, then outcomes and codes with noise."""
    age = int(min(96, max(18, rng.gauss(*problem.age))))
    decades = (age - 65) / 10
    sex = rng.choice("MF")
    conditions = {c.key for c in CONDITIONS if rng.random() < _sigmoid(_logit(c.prevalence) + c.per_decade * decades)}
    conditions.update(problem.implies)
    if "etoh" in conditions and rng.random() < 0.3:
        conditions.add("cirrhosis")
    conditions = sorted(conditions)  # a set's order changes with PYTHONHASHSEED, and draws below follow this order
    smoker = rng.choices(("never", "former", "current"), (5, 3, 2) if "copd" not in conditions else (1, 5, 4))[0]
    risk = sum(CONDITION_BY_KEY[k].risk for k in conditions)
    severity = rng.gauss(0, 1) + problem.severity + 0.5 * risk + 0.15 * decades

    ventilated = rng.random() < _sigmoid(-1.6 + 1.1 * severity + problem.vent)
    vent_days = 0.0
    if ventilated:
        lung = 0.5 * ("copd" in conditions) + 0.3 * (problem.key in ("pna", "ich", "mvc"))
        vent_days = math.exp(math.log(3.0) + 0.6 * severity + lung + 0.1 * decades + rng.gauss(0, 0.6))
    died = rng.random() < _sigmoid(-3.9 + 1.1 * severity + 0.35 * decades + problem.death + 0.4 * ventilated)
    los = math.exp(math.log(problem.los) + 0.3 * severity + 0.06 * len(conditions) + rng.gauss(0, 0.5))
    if ventilated:
        los = max(los, vent_days + rng.uniform(0.5, 5))
    if died:
        los *= rng.uniform(0.3, 1.0)

    diagnoses = {CONDITION_BY_KEY[k].code for k in conditions if rng.random() < 0.85}
    diagnoses.update(code for code, p in problem.dx if rng.random() < p)
    hidden = (
        ("584", -2.4 + 0.8 * severity),
        ("276", -1.2 + 0.5 * severity),
        ("293", -2.8 + 0.5 * severity + 0.4 * decades),
        ("285", -2.0 + 0.4 * severity),
        ("599", -2.6),
        ("707", -4.0 + 0.15 * los),
        ("E878", -4.0),
    )
    diagnoses.update(code for code, logit in hidden if rng.random() < _sigmoid(logit))
    if ventilated and rng.random() < 0.7:
        diagnoses.add("518")
    if "afib" in conditions and rng.random() < 0.6:
        diagnoses.add("V586")
    if smoker == "former" and rng.random() < 0.5:
        diagnoses.add("V158")

    procedures = {code for code, p in problem.proc if rng.random() < p}
    if ventilated:
        procedures.update(code for code, p in (("967", 0.95), ("960", 0.7)) if rng.random() < p)
        if vent_days > 10 and rng.random() < 0.5:
            procedures.add("311")
        if vent_days > 5 and rng.random() < 0.5:
            procedures.add("966")
    general = (
        ("389", -1.8 + 1.0 * severity),
        ("990", -2.6 + 0.7 * severity),
        ("887", -2.0),
        ("399", 1.5 if "ckd" in conditions and rng.random() < 0.3 else -4.0 + 0.6 * severity),
        ("549", 0.0 if "cirrhosis" in conditions else -6.0),
        ("996", -1.0 if "afib" in conditions else -5.0),
    )
    procedures.update(code for code, logit in general if rng.random() < _sigmoid(logit))

    admit = dt.date(2100, 1, 1) + dt.timedelta(days=rng.randrange(100 * 365))
    return Patient(
        subject_id=subject_id,
        hadm_id=subject_id + 10_000_000,
        age=age,
        sex=sex,
        conditions=tuple(sorted(conditions)),
        problem=problem.key,
        severity=round(severity, 4),
        smoker=smoker,
        ventilated=ventilated,
        vent_days=round(vent_days, 2),
        los_days=round(los, 2),
        died=died,
        diagnoses=tuple(sorted(diagnoses)),
        procedures=tuple(sorted(procedures)),
        admit=admit,
    )


# -------------------------------------------------------------------------------------------------- notes

_CHOICE = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def _fill(rng: random.Random, template: str, ctx: dict[str, str]) -> str:
    """Resolve ``{a|b|c}`` alternatives at random, then ``{name}`` fields from ``ctx``."""
    return _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), template).format(**ctx)


def _deid(rng: random.Random, kind: str) -> str:
    """A MIMIC-III style de-identification placeholder."""
    n = rng.randrange(1, 9999)
    forms = {
        "name": ("Known lastname {n}", "Last Name (NamePattern1) {n}", "Name (NI) {n}", "Known firstname {n}"),
        "doctor": (
            "First Name8 (NamePattern2) {n}",
            "Doctor Last Name {n}",
            "Last Name (LF) {n}",
            "First Name3 (LF) {n}",
        ),
        "hospital": ("Hospital1 {n}", "Hospital {n}", "Hospital3 {n}"),
        "place": ("Location (un) {n}", "State {n}", "Location {n}"),
        "phone": ("Telephone/Fax (1) {n}",),
        "company": ("Company {n}",),
    }[kind]
    return "[**" + rng.choice(forms).format(n=n) + "**]"


def _date(day: dt.date) -> str:
    """A de-identified date as MIMIC-III writes it."""
    return f"[**{day.year}-{day.month}-{day.day}**]"


def remove_death_mentions(text: str) -> str:
    """Drop every sentence (or line) that mentions death, as the task notes were built."""
    kept = []
    for line in text.split("\n"):
        sentences = re.split(r"(?<=[.!?;])\s+", line)
        kept.append(" ".join(s for s in sentences if not DEATH_WORDS.search(s)))
    return "\n".join(kept).strip()


def _context(patient: Patient) -> dict[str, str]:
    """Pronouns and demographic words for templates."""
    male = patient.sex == "M"
    he, his, him = ("he", "his", "him") if male else ("she", "her", "her")
    return {
        "he": he,
        "He": he.capitalize(),
        "his": his,
        "His": his.capitalize(),
        "him": him,
        "man": "man" if male else "woman",
        "male": "male" if male else "female",
        "sx": patient.sex,
        "title": "Mr." if male else "Ms.",
        "age": str(patient.age),
    }


@dataclass
class _Findings:
    """What the admission exam measured (the latent acuity seen through noise)."""

    temp: float
    hr: int
    sbp: int
    dbp: int
    rr: int
    spo2: int
    o2: str
    icu: bool
    intubated: bool
    pressors: bool
    ams: bool


def _findings(patient: Patient, rng: random.Random) -> _Findings:
    """Vitals and ICU signs drawn from the latent acuity with measurement noise."""
    s, problem = patient.severity + rng.gauss(0, 0.6), PROBLEM_BY_KEY[patient.problem]
    fever = problem.fever and rng.random() < 0.75
    temp = round(98.2 + rng.gauss(0, 0.5) + (rng.uniform(1.0, 4.0) if fever else 0.0), 1)
    spo2 = int(min(100, max(72, rng.gauss(96.5 - 2.2 * max(s, 0), 2))))
    o2 = (
        "RA"
        if spo2 > 94 and rng.random() < 0.7
        else rng.choice(("2L NC", "4L NC", "6L NC", "NRB", "50% FiO2 face mask"))
    )
    intubated = patient.ventilated and rng.random() < 0.55
    return _Findings(
        temp=temp,
        hr=int(min(170, max(40, rng.gauss(86 + 11 * s, 12)))),
        sbp=int(min(230, max(62, rng.gauss(132 - 14 * s, 18)))),
        dbp=int(min(120, max(30, rng.gauss(74 - 6 * s, 10)))),
        rr=int(min(40, max(10, rng.gauss(17 + 2.5 * s, 3)))),
        spo2=spo2,
        o2="vent" if intubated else o2,
        icu=s + rng.gauss(0, 0.5) > 0.9 or intubated,
        intubated=intubated,
        pressors=s > 1.6 and rng.random() < 0.6,
        ams=s > 1.3 and rng.random() < 0.5,
    )


# fmt: off
_INTROS = (
    "{age} yo {sx} with PMH of {pmh} who presents with {cc}.",
    "{title} {name} is a {age} year old {man} with a history of {pmh} who presented to {hospital} with {cc}.",
    "{age}{sx} w/ {pmh} p/w {cc} x {duration}.",
    "This is a {age}-year-old {man} with {pmh}, transferred from {hospital} for {cc}.",
    "Pt is a {age} y/o {man} with hx of {pmh} admitted with {cc}.",
    "{age} y.o. {male} with {pmh} who was brought in by EMS with {cc}.",
    "Patient is a {age} year-old {male} with a past medical history significant for {pmh}, now presenting with {cc} "
    "for {duration}.",
)
_DURATIONS = ("1 day", "2 days", "3 days", "1 week", "several days", "24 hours", "2 weeks", "a few hours")
_ED_VITALS = "{In the ED, initial vitals were:|In the ED, VS:|Initial ED vitals:|On arrival to the ED,} {vitals}."
_INTUBATED = "{He} was intubated for {hypoxic respiratory failure|airway protection|hypercarbic respiratory failure}."
_PRESSORS = "{He} remained hypotensive despite fluids and was started on {levophed|norepinephrine|phenylephrine}."
_CONFUSED = "{He} was {confused|somnolent|agitated} and unable to provide a full history."
_ADMITTED = ("{He} was admitted to the {where} for further management.", "Admitted to the {where}.",
             "{He} is being admitted to the {where}.")
_ICU_BY_SERVICE = {"CARDIOLOGY": "CCU", "NEUROLOGY": "Neuro ICU", "NEUROSURGERY": "Neuro ICU",
                   "TRAUMA SURGERY": "TSICU", "GENERAL SURGERY": "SICU", "ORTHOPAEDICS": "SICU",
                   "CARDIOTHORACIC": "CVICU"}
_WARDS = ("floor", "medicine floor", "step-down unit")
_ROS = ("ROS otherwise negative in detail.", "10-point ROS negative except as per HPI.",
        "Denies headache, vision changes, abdominal pain, dysuria.", "Review of systems is otherwise negative.")
_CODE_STATUS = ("Code status: full code.", "Code: DNR/DNI, confirmed with HCP.", "Full code, presumed.")
_NORMAL_EXAM = {
    "General": ("NAD, alert and conversant", "well-appearing, in no acute distress", "comfortable, pleasant",
                "AOx3, NAD"),
    "HEENT": ("NCAT, PERRL, EOMI, MMM", "sclera anicteric, MMM, oropharynx clear", "normocephalic, atraumatic"),
    "Neck": ("supple, JVP not elevated, no LAD", "supple, no JVD", "no lymphadenopathy"),
    "CV": ("RRR, no m/r/g", "regular rate and rhythm, normal S1 S2, no murmurs", "RRR, nl S1/S2"),
    "Lungs": ("CTAB", "clear to auscultation bilaterally, no wheezes, rales or rhonchi", "CTA b/l, good air movement"),
    "Abd": ("soft, NT/ND, +BS", "soft, non-tender, non-distended, normoactive bowel sounds", "benign"),
    "Ext": ("no c/c/e, 2+ DP pulses", "warm, well perfused, no edema", "WWP, no clubbing, cyanosis or edema"),
    "Neuro": ("A&Ox3, CN II-XII intact, strength 5/5 throughout", "alert, oriented, moving all extremities",
              "nonfocal"),
}
_SICK_EXAM = {
    "General": ("ill-appearing, diaphoretic", "lethargic, arousable to voice", "in moderate respiratory distress"),
    "Neuro": ("lethargic, oriented x1", "somnolent, follows simple commands", "obtunded, withdraws to pain"),
}
_INTUBATED_EXAM = ("intubated, sedated", "intubated and sedated, not following commands")
_O2 = ("2L NC", "4L NC", "6L NC", "NRB", "50% FiO2 face mask")
_FILLER_HISTORY = ("s/p appendectomy", "s/p cholecystectomy", "remote tonsillectomy", "cataracts", "osteoporosis",
                   "h/o nephrolithiasis", "BPH", "s/p TAH/BSO", "lumbar spinal stenosis", "s/p R TKR", "migraines",
                   "h/o C. diff colitis", "glaucoma", "s/p hernia repair")
_FILLER_MEDS = ("multivitamin 1 tab daily", "docusate 100 mg BID", "vitamin D3 1000 units daily",
                "senna 8.6 mg qHS PRN", "calcium carbonate 500 mg BID", "tamsulosin 0.4 mg qHS",
                "fish oil 1000 mg daily", "melatonin 3 mg qHS")
_ALLERGIES = ("NKDA", "No Known Allergies / Adverse Drug Reactions",
              "Patient recorded as having No Known Allergies to Drugs", "Penicillins",
              "Sulfa (Sulfonamide Antibiotics)", "Codeine", "Morphine", "Iodine; Iodine Containing",
              "Penicillins / Lisinopril", "Latex", "Bactrim / Ciprofloxacin", "Shellfish Derived")
_FAMILY = ("Non-contributory.", "Mother with {breast cancer|HTN|DM2}; father with {CAD|COPD|prostate cancer}.",
           "Father died of an MI at age {52|60|68}.", "Mother deceased at {70|78|85} from stroke.",
           "No family history of early MI, arrhythmia, cardiomyopathies, or sudden cardiac death.",
           "Brother with colon cancer. Sister with {lupus|DM}.", "Unknown, patient adopted.",
           "Family history of {diabetes|hypertension|CAD} in both parents.", "No family history of seizures or stroke.")
_LIVING = ("Lives with {his} {wife|husband|daughter|son} in {place}.", "Lives alone in an apartment in {place}.",
           "Resides at {hospital} nursing home.", "Lives with {his} partner; independent in ADLs.",
           "Recently widowed; {his} spouse passed away last year.", "Homeless, staying in shelters.")
_WORK = ("Retired {teacher|engineer|nurse|machinist|postal worker|accountant}.",
         "Works as a {construction worker|cook|lawyer|bus driver}.", "On disability.", "")
_TOBACCO = {"never": "{Never smoker.|Tobacco: denies.|No tobacco.}",
            "former": "Former smoker, {packs} pack-years, quit {quit} years ago.",
            "current": "Current smoker, {1/2|1|2} ppd, {packs} pack-year history."}
_ETOH = {True: "EtOH: {6-8 beers daily|1 pint of vodka daily|heavy, last drink yesterday}.",
         False: "EtOH: {social|denies|rare|1-2 glasses of wine/week}."}
_DRUGS = ("Illicits: denies.", "No IVDU.", "Denies illicit drug use.", "Remote marijuana use.")
_COURSE_OPENINGS = ("{age} yo {sx} with {pmh} admitted with {problem}.",
                    "{title} {name} is a {age} year old {man} admitted for {problem}.")
_COMPLICATION_COURSE = ("managed supportively.", "resolved.", "improved prior to discharge.")
_CHRONIC_COURSE = ("continued home {med}.", "held {med} on admission, restarted prior to discharge.",
                   "stable, continued {med}.")
_DEATH_COURSE = (
    "Despite maximal support {his} condition worsened. After discussion with the family the patient was made comfort "
    "measures only and expired on {day}.",
    "{He} developed refractory shock and passed away on {day} with family at the bedside.",
    "Family meeting held; goals of care transitioned to comfort. Patient died on {day}.",
)
_DISCHARGE_CONDITION = (
    "Mental Status: Clear and coherent. Level of Consciousness: Alert and interactive. Activity Status: Ambulatory - "
    "Independent.",
    "stable", "Good. Tolerating PO, ambulating with assistance.",
)
_INSTRUCTIONS = (
    "You were admitted to the hospital for {problem}. Please take your medications as prescribed and return to the ED "
    "for fever, chest pain or shortness of breath.",
    "It was a pleasure taking care of you at {hospital}. You were treated for {problem}.",
)
# fmt: on


@dataclass
class _Admission:
    """The rendered admission sections plus what the discharge summary reuses."""

    sections: dict[str, str]
    meds: list[str]
    mentioned: list[str]  # condition keys named in the history


def _format_list(rng: random.Random, items: list[str]) -> str:
    """A list as clinicians write it: dashes, numbers, hashes or commas."""
    style = rng.randrange(4)
    if style == 3:
        return ", ".join(items)
    return "\n".join(f"{('-', f'{i}.', '#')[style]} {x}" for i, x in enumerate(items, 1))


def _present_illness(patient: Patient, rng: random.Random, f: _Findings, cc: str, mentioned: list[str]) -> str:
    """HPI: introduction, part of the problem's story (sometimes a misleading sentence), ED course, disposition."""
    problem, ctx = PROBLEM_BY_KEY[patient.problem], _context(patient)
    pmh = ", ".join(_fill(rng, CONDITION_BY_KEY[k].names[0], {}) for k in mentioned[:3])
    intro = {
        **ctx,
        "pmh": pmh or "{no significant PMH|no known medical history}",
        "cc": cc,
        "duration": rng.choice(_DURATIONS),
        "name": _deid(rng, "name"),
        "hospital": _deid(rng, "hospital"),
    }
    hpi = [_fill(rng, rng.choice(_INTROS), intro)]
    hpi += [_fill(rng, s, ctx) for s in rng.sample(problem.story, rng.randint(1, min(3, len(problem.story))))]
    if rng.random() < 0.25:  # a sentence from another problem's story: realistic noise
        hpi.append(_fill(rng, rng.choice(rng.choice(PROBLEMS).story), ctx))
    vitals = f"T {f.temp} HR {f.hr} BP {f.sbp}/{f.dbp} RR {f.rr} O2 sat {f.spo2}% on {f.o2}"
    hpi.append(_fill(rng, _ED_VITALS, {"vitals": vitals}))
    hpi += [_fill(rng, s, ctx) for s in rng.sample(problem.ed, rng.randint(1, len(problem.ed)))]
    if f.intubated and not any("intubated" in s for s in hpi):
        hpi.append(_fill(rng, _INTUBATED, ctx))
    if f.pressors:
        hpi.append(_fill(rng, _PRESSORS, ctx))
    if f.ams:
        hpi.append(_fill(rng, _CONFUSED, ctx))
    where = _ICU_BY_SERVICE.get(problem.service, "MICU") if f.icu else rng.choice(_WARDS)
    hpi.append(_fill(rng, rng.choice(_ADMITTED), {**ctx, "where": where}))
    if rng.random() < 0.35:
        hpi.append("ROS: unable to obtain." if f.ams else rng.choice(_ROS))
    if rng.random() < 0.2:
        hpi.append(rng.choice(_CODE_STATUS))
    return " ".join(hpi)


def _physical_exam(patient: Patient, rng: random.Random, f: _Findings) -> str:
    """Admission exam: vitals re-measured, normal findings replaced by sick or problem-specific ones."""
    exam = {system: rng.choice(options) for system, options in _NORMAL_EXAM.items()}
    if f.ams or f.intubated or patient.severity > 1.2:
        exam.update((system, rng.choice(options)) for system, options in _SICK_EXAM.items())
    for system, finding in PROBLEM_BY_KEY[patient.problem].exam:
        if rng.random() < 0.65:
            exam[system] = _fill(rng, finding, _context(patient))
    if f.intubated:
        exam["General"] = rng.choice(_INTUBATED_EXAM)
    temp, sbp, hr = round(f.temp + rng.gauss(0, 0.2), 1), f.sbp + rng.randint(-8, 8), f.hr + rng.randint(-6, 6)
    vitals = rng.choice(("Vitals: ", "VS: ", "")) + f"T {temp} BP {sbp}/{f.dbp} HR {hr} RR {f.rr} {f.spo2}% {f.o2}"
    return rng.choice(("\n", " ", "\n")).join([vitals] + [f"{k}: {v}" for k, v in exam.items()])


def _social_history(patient: Patient, rng: random.Random) -> str:
    """Living situation, work, tobacco, alcohol (heavy with alcohol use disorder) and drugs."""
    ctx = {
        **_context(patient),
        "place": _deid(rng, "place"),
        "hospital": _deid(rng, "hospital"),
        "packs": str(rng.choice((10, 20, 30, 40, 60))),
        "quit": str(rng.randint(1, 30)),
    }
    parts = [
        rng.choice(_LIVING),
        rng.choice(_WORK),
        _TOBACCO[patient.smoker],
        _ETOH["etoh" in patient.conditions],
        rng.choice(_DRUGS),
    ]
    return " ".join(_fill(rng, p, ctx) for p in parts if p)


def _admission(patient: Patient, rng: random.Random) -> _Admission:
    """van Aken's eight admission sections for one patient (before death mentions are removed)."""
    problem = PROBLEM_BY_KEY[patient.problem]
    f = _findings(patient, rng)
    mentioned = [k for k in patient.conditions if rng.random() < 0.85]
    history = [_fill(rng, rng.choice(CONDITION_BY_KEY[k].names), {}) for k in mentioned]
    history += rng.sample(_FILLER_HISTORY, rng.randrange(0, 3))
    rng.shuffle(history)
    meds = [_fill(rng, rng.choice(CONDITION_BY_KEY[k].meds), {}) for k in mentioned if CONDITION_BY_KEY[k].meds]
    meds += rng.sample(_FILLER_MEDS, rng.randrange(0, 3))
    if f.intubated and rng.random() < 0.3:
        med_text = "Unable to obtain; patient intubated. Per records: " + (", ".join(meds[:3]) or "none")
    else:
        med_text = _format_list(rng, [m[0].upper() + m[1:] for m in meds]) if meds else "None."
    cc = _fill(rng, rng.choice(problem.complaints), _context(patient))
    sections = {
        "CHIEF COMPLAINT": cc[0].upper() + cc[1:],
        "PRESENT ILLNESS": _present_illness(patient, rng, f, cc, mentioned),
        "MEDICAL HISTORY": _format_list(rng, history) if history else "None.",
        "MEDICATION ON ADMISSION": med_text,
        "ALLERGIES": rng.choice(_ALLERGIES),
        "PHYSICAL EXAM": _physical_exam(patient, rng, f),
        "FAMILY HISTORY": _fill(rng, rng.choice(_FAMILY), _context(patient)),
        "SOCIAL HISTORY": _social_history(patient, rng),
    }
    return _Admission(sections, meds, mentioned)


def _labs(patient: Patient, rng: random.Random) -> str:
    """Admission labs in MIMIC's ``Pertinent Results`` layout."""
    s, p, c = max(patient.severity, 0.0), patient.problem, patient.conditions
    hgb = max(4.0, rng.gauss(7.4 if p == "gib" else 12.5 - 0.6 * s - (1.5 if "ckd" in c else 0), 1.0))
    cr = max(0.4, rng.gauss(4.2 if p == "aki" else 1.0 + 0.3 * s + (1.0 if "ckd" in c else 0), 0.3))
    glucose = max(50.0, rng.gauss(520 if p == "dka" else 120 + (60 if "dm" in c else 0), 30))
    wbc = max(1.5, rng.gauss(14 if PROBLEM_BY_KEY[p].fever else 8.5 + 1.5 * s, 2.5))
    at = f"{_date(patient.admit)} {rng.randint(1, 12):02d}:{rng.randint(0, 59):02d}{rng.choice(('AM', 'PM'))} BLOOD"
    bun = rng.randint(8, 30) + 15 * max(cr - 1, 0)
    rows = [
        f"{at} WBC-{wbc:.1f} RBC-{hgb / 3:.2f} HGB-{hgb:.1f} HCT-{hgb * 3:.1f} MCV-{rng.randint(78, 101)} "
        f"PLT COUNT-{rng.randint(90, 420)}",
        f"{at} GLUCOSE-{glucose:.0f} UREA N-{bun:.0f} CREAT-{cr:.1f} SODIUM-{rng.randint(128, 145)} "
        f"POTASSIUM-{rng.uniform(3.2, 5.4):.1f} CHLORIDE-{rng.randint(95, 110)} TOTAL CO2-{rng.randint(14, 30)} "
        f"ANION GAP-{rng.randint(8, 20)}",
    ]
    if s > 0.5 or rng.random() < 0.3:
        rows.append(f"{at} LACTATE-{max(0.6, rng.gauss(1.4 + 1.1 * s, 0.5)):.1f}")
    if p in ("mi", "chf", "cabg") or rng.random() < 0.2:
        rows.append(f"{at} cTropnT-{0.8 if p == 'mi' else 0.02 * rng.randint(0, 5):.2f}")
    return "\n".join(rows)


def _hospital_course(patient: Patient, rng: random.Random, mentioned: list[str]) -> str:
    """``Brief Hospital Course``: the problem, complications, chronic issues, and the outcome."""
    problem, ctx = PROBLEM_BY_KEY[patient.problem], _context(patient)
    pmh = ", ".join(_fill(rng, CONDITION_BY_KEY[k].names[0], {}) for k in mentioned[:3]) or "no PMH"
    opening = {**ctx, "pmh": pmh, "name": _deid(rng, "name"), "problem": problem.title}
    parts = [_fill(rng, rng.choice(_COURSE_OPENINGS), opening)]
    parts.append(f"# {problem.title.capitalize()}: " + " ".join(_fill(rng, s, ctx) for s in problem.course))
    if patient.ventilated:
        days = max(1, round(patient.vent_days))
        end = "a tracheostomy was placed." if "311" in patient.procedures else "then extubated."
        parts.append(f"# Respiratory failure: intubated and mechanically ventilated for {days} days, {end}")
    problem_codes = {code for code, _ in problem.dx}
    for code in ("584", "293", "707"):
        if code in patient.diagnoses and code not in problem_codes:
            parts.append(f"# {DIAGNOSIS_NAMES[code].capitalize()}: {rng.choice(_COMPLICATION_COURSE)}")
    for key in mentioned[:4]:
        cond = CONDITION_BY_KEY[key]
        if cond.meds:
            med = _fill(rng, cond.meds[0], {}).split()[0]
            parts.append(f"# {cond.names[0]}: " + _fill(rng, rng.choice(_CHRONIC_COURSE), {"med": med}))
    if patient.died:
        day = _date(patient.admit + dt.timedelta(days=int(patient.los_days)))
        parts.append(_fill(rng, rng.choice(_DEATH_COURSE), {**ctx, "day": day}))
    return "\n".join(parts)


def render_note(patient: Patient, rng: random.Random, kind: str = "discharge") -> str:
    """A note for ``patient``: ``"admission"`` (van Aken's eight sections, death mentions removed; the task
    input) or ``"discharge"`` (a MIMIC-III style discharge summary; the DAPT corpus)."""
    if kind not in ("admission", "discharge"):
        raise ValueError(f"kind must be 'admission' or 'discharge', got {kind!r}")
    adm = _admission(patient, rng)
    s = adm.sections
    if kind == "admission":
        return "\n\n".join(f"{name}: {remove_death_mentions(s[name])}" for name in ADMISSION_SECTIONS)
    problem = PROBLEM_BY_KEY[patient.problem]
    discharge = patient.admit + dt.timedelta(days=max(1, round(patient.los_days)))
    birth = dt.date(patient.admit.year - patient.age, rng.randint(1, 12), rng.randint(1, 28))
    problem_codes = {code for code, _ in problem.dx}
    secondary = ", ".join(DIAGNOSIS_NAMES[c] for c in patient.diagnoses if c not in problem_codes) or "none"
    parts = [
        f"Admission Date:  {_date(patient.admit)}              Discharge Date:   {_date(discharge)}",
        f"Date of Birth:  {_date(birth)}             Sex:   {patient.sex}",
        f"Service: {problem.service}",
        f"Allergies:\n{s['ALLERGIES']}",
        f"Attending:{_deid(rng, 'doctor')}",
        f"Chief Complaint:\n{s['CHIEF COMPLAINT']}",
        "Major Surgical or Invasive Procedure:\n"
        + (", ".join(PROCEDURE_NAMES[c] for c in patient.procedures) or "None"),
        f"History of Present Illness:\n{s['PRESENT ILLNESS']}",
        f"Past Medical History:\n{s['MEDICAL HISTORY']}",
        f"Social History:\n{s['SOCIAL HISTORY']}",
        f"Family History:\n{s['FAMILY HISTORY']}",
        f"Physical Exam:\n{s['PHYSICAL EXAM']}",
        f"Pertinent Results:\n{_labs(patient, rng)}",
        f"Brief Hospital Course:\n{_hospital_course(patient, rng, adm.mentioned)}",
        f"Medications on Admission:\n{s['MEDICATION ON ADMISSION']}",
    ]
    diagnosis = f"Discharge Diagnosis:\nPrimary: {problem.title}\nSecondary: {secondary}"
    if patient.died:
        parts += [
            "Discharge Medications:\nNone",
            "Discharge Disposition:\nExpired",
            diagnosis,
            "Discharge Condition:\nExpired",
            "Discharge Instructions:\nNone",
            "Followup Instructions:\nNone",
        ]
        return "\n\n".join(parts) + "\n"
    disposition = (
        rng.choice(("Home", "Home With Service", "Extended Care")) if patient.los_days < 10 else "Extended Care"
    )
    facility = "" if disposition == "Home" else f"\n\nFacility:\n{_deid(rng, 'company')}"
    followup = _date(discharge + dt.timedelta(days=rng.randint(5, 30)))
    parts += [
        "Discharge Medications:\n" + (_format_list(rng, adm.meds) if adm.meds else "None"),
        f"Discharge Disposition:\n{disposition}{facility}",
        diagnosis,
        f"Discharge Condition:\n{rng.choice(_DISCHARGE_CONDITION)}",
        "Discharge Instructions:\n"
        + _fill(rng, rng.choice(_INSTRUCTIONS), {"problem": problem.title, "hospital": _deid(rng, "hospital")}),
        f"Followup Instructions:\nProvider: {_deid(rng, 'doctor')} Phone: {_deid(rng, 'phone')} Date/Time: {followup}",
    ]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------- writers


def _note_rng(cohort: str, seed: int, patient: Patient, kind: str) -> random.Random:
    """A per-note random stream: a note does not change when other patients are added."""
    return random.Random(f"minilora-note:{cohort}:{seed}:{patient.hadm_id}:{kind}")


def patient_split(subject_id: int, seed: int = 0) -> str:
    """``train`` / ``val`` / ``test`` (~70/10/20) from a hash of the patient, so every task splits alike."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{subject_id}".encode(), digest_size=8).digest(), "little") / 2**64
    return "train" if u < 0.7 else "val" if u < 0.8 else "test"


def write_dapt_corpus(path: str | Path, n: int = DEFAULT_DAPT_NOTES, seed: int = 0) -> Path:
    """A JSONL (``.gz`` when the name says so) of ``n`` synthetic discharge summaries: ``{"note_id", "text"}``
    per line, note ids MIMIC-IV style (``<subject>-DS-1``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # written whole, then renamed: a reader never sees half
    raw = gzip.GzipFile(tmp, "wb", mtime=0) if path.name.endswith(".gz") else open(tmp, "wb")  # mtime=0: same bytes
    with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as fh:
        for patient in generate_patients(n, seed, cohort="dapt"):
            text = render_note(patient, _note_rng("dapt", seed, patient, "discharge"), "discharge")
            fh.write(json.dumps({"note_id": f"{patient.subject_id}-DS-1", "text": text}) + "\n")
    os.replace(tmp, path)
    return path


def task_label(patient: Patient, spec: TaskSpec) -> str | None:
    """The label cell for ``patient`` in task ``spec``, or None when the patient is not in that task's cohort
    (LOS excludes in-hospital deaths, PMV keeps ventilated patients, PROC admissions with a procedure)."""
    if spec.name == "mortality":
        return str(int(patient.died))
    if spec.name == "los":
        return None if patient.died else str(patient.los_label)
    if spec.name == "pmv":
        return str(int(patient.prolonged_ventilation)) if patient.ventilated else None
    codes = patient.diagnoses if spec.name == "diagnoses" else patient.procedures
    return ",".join(codes) if codes else None


def write_task_csvs(directory: str | Path, task: str, n: int = DEFAULT_TASK_PATIENTS, seed: int = 0) -> dict[str, Path]:
    """``{prefix}_{train,val,test}.csv`` (``dev`` for PMV) for ``task`` from ``n`` task-cohort patients, in the
    van Aken format: all fields quoted, columns ``id, text, <label column>``, id = hadm_id, split by patient."""
    spec = task_spec(task)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[list[str]]] = {s: [] for s in ("train", "val", "test")}
    for patient in generate_patients(n, seed, cohort="task"):
        label = task_label(patient, spec)
        if label is None:
            continue
        text = render_note(patient, _note_rng("task", seed, patient, "admission"), "admission")
        rows[patient_split(patient.subject_id, seed)].append([str(patient.hadm_id), text, label])
    paths = {}
    for split, name in zip(("train", "val", "test"), spec.splits):
        paths[name] = directory / spec.file(name)
        tmp = paths[name].with_name(f".{paths[name].name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
            writer.writerow(["id", "text", spec.label_column])
            writer.writerows(rows[split])
        os.replace(tmp, paths[name])
    return paths
